"""Why #5 and #6: uploads cannot exhaust the machine or leave half an archive behind (and Gradio's temporary copies
go away), and restoring settings from a PNG reads its text chunks only, checks every value like /generate, and
answers a bad file with one clear message."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from app_server_support import running_app, wait_until_ready
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, PngImagePlugin

from app.workspace import folder_bytes, user_folder_name

MIB = 1024**2


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bomb(path: Path, gib: float = 1.0) -> Path:
    """A ~1 MB zip holding `gib` GiB of zeros as one 'image' (streamed, never held in memory)."""
    zeros = bytes(8 * MIB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("set/ok.png", png_bytes())
        with archive.open("set/zeros.png", "w", force_zip64=True) as member:
            for _ in range(int(gib * 1024 / 8)):
                member.write(zeros)
    return path


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")} if folder.exists() else set()


def test_a_zip_bomb_is_refused_from_its_directory_without_memory_or_disk(login_app, bob, tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 8 * MIB
    workspace = login_app.workspaces() / user_folder_name("bob")
    before, peak = tree(workspace), login_app.peak_memory_bytes()
    with pytest.raises(AppError, match="times larger than it is packed"):
        bob.predict([handle_file(str(bomb))], api_name="/recaption_upload_zip")
    assert login_app.peak_memory_bytes() - peak < 256 * MIB  # today: +1.9 GiB
    assert tree(workspace) == before  # nothing unpacked, no partial folder
    assert not [path for path in login_app.temp_dir.rglob("bomb.zip")]  # Gradio's copy is gone too


def test_a_refused_zip_leaves_nothing_behind(login_app, bob, tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        for index in range(3):
            archive.writestr(f"set/good{index}.png", png_bytes())  # members before the bad one
        archive.writestr("../../escaped.png", png_bytes())
    output_before = tree(login_app.output_dir)
    with pytest.raises(AppError, match="unsafe path"):
        bob.predict([handle_file(str(evil))], api_name="/recaption_upload_zip")
    assert tree(login_app.output_dir) == output_before
    assert not list(login_app.temp_dir.rglob("evil.zip"))


def test_a_good_upload_lands_in_the_workspace_and_its_temporary_copy_is_removed(login_app, bob, tmp_path):
    good = tmp_path / "good-set.zip"
    with zipfile.ZipFile(good, "w") as archive:
        for index in range(2):
            archive.writestr(f"set/img{index}.png", png_bytes())
        archive.writestr("set/readme.exe", b"MZ")
        archive.writestr("set/progress.jsonl", b'{"event": "item", "key": "../../x"}')  # not a dataset file
    dataset, _ = bob.predict([handle_file(str(good))], api_name="/recaption_upload_zip")
    folder = login_app.workspaces() / user_folder_name("bob") / "uploads" / dataset["value"]
    assert sorted(tree(folder)) == ["set", "set/img0.png", "set/img1.png"]
    assert not list(login_app.temp_dir.rglob("good-set.zip"))


def png_with_header(path: Path, width: int, height: int, text: dict[str, str], rows: int = 0) -> Path:
    """A 1-bit greyscale PNG claiming `width` x `height` with `text` chunks; `rows` > 0 writes that many real (zero)
    rows of pixel data, streamed, so a decoder has real work to do."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with path.open("wb") as stream:
        stream.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        for key, value in text.items():
            stream.write(chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
        compressor = zlib.compressobj(1)
        row = bytes(1 + (width + 7) // 8)
        data = b"".join(compressor.compress(row * 256) for _ in range(rows // 256)) + compressor.flush()
        stream.write(chunk(b"IDAT", data))
        stream.write(chunk(b"IEND", b""))
    return path


A1111_OK = "a castle\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 512x768, Model: Lens"


def test_restore_reads_only_the_text_of_a_huge_png(login_app, bob, tmp_path):
    big = png_with_header(tmp_path / "big.png", 12_800, 12_800, {"parameters": A1111_OK}, rows=12_800)  # 164 MP
    peak = login_app.peak_memory_bytes()
    values = bob.predict(handle_file(str(big)), api_name="/restore_settings")
    assert values[0] == "a castle" and values[9] == 9
    assert login_app.peak_memory_bytes() - peak < 64 * MIB  # today: the pixels were decoded (+600 MiB)
    assert not list(login_app.temp_dir.rglob("big.png"))


@pytest.mark.parametrize(
    ("name", "width", "text", "message"),
    [
        ("huge.png", 20_000, {"parameters": A1111_OK}, "header says 20000x20000 pixels"),
        ("typed.png", 64, {"lens": json.dumps({"prompt": "x", "seed": "abc"})}, "'seed' must be an integer"),
        ("list.png", 64, {"lens": "[1, 2]"}, "must be a JSON object"),
        ("deep.png", 64, {"lens": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
        ("seed.png", 64, {"parameters": A1111_OK.replace("Seed: 9", "Seed: 12345678901234567890123")}, "seed must"),
        ("size.png", 64, {"parameters": A1111_OK.replace("512x768", "0x0")}, "width must be an integer from 64"),
        ("steps.png", 64, {"parameters": A1111_OK.replace("Steps: 20", "Steps: -20")}, "num_inference_steps must"),
        (
            "cfg.png",
            64,
            {"parameters": A1111_OK.replace("CFG scale: 5", "CFG scale: nan")},
            "'guidance_scale' must be a number",
        ),
    ],
)
def test_bad_pngs_get_one_clear_message(login_app, bob, tmp_path, name, width, text, message):
    path = png_with_header(tmp_path / name, width, width, text)
    with pytest.raises(AppError, match=message):
        bob.predict(handle_file(str(path)), api_name="/restore_settings")
    # The page's drop zone: the same reason shown next to it, and no form field changed.
    raw = login_app.raw("bob")
    outcome = raw.call("restore", [raw.upload(path)])
    assert outcome.success
    updates = dict(zip(raw.dependency("restore")["outputs"], outcome.data, strict=True))
    message_id = next(c["id"] for c in raw.config["components"] if c["props"].get("elem_id") == "restore-message")
    assert message in str(updates.pop(message_id))
    assert all(value in (None, {"__type__": "update"}) for value in list(updates.values())[:-1])
    assert "ready" in bob.predict(api_name="/model_status")


def test_an_ordinary_lens_png_still_restores(bob, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_itxt("lens", json.dumps({"prompt": "a teapot", "seed": 5, "width": 832, "height": 1248}))
    path = tmp_path / "ours.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    values = bob.predict(handle_file(str(path)), api_name="/restore_settings")
    assert (values[0], values[4], values[5], values[9]) == ("a teapot", 832, 1248, 5)


def noise_zip(path: Path, side: int, seed: int) -> Path:
    """A zip holding one incompressible PNG of about side * side * 3 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("set/noise.png", buffer.getvalue())
    return path


def test_a_workspace_quota_refuses_what_does_not_fit_until_the_visitor_deletes(tmp_path):
    """Repeated uploads and images cannot fill the server's disk: with `--workspace-limit-gb`, an upload that does
    not fit and work started in a full workspace are refused with a message saying how to make room, and deleting
    one's own dataset (Recaption tab) makes room again."""
    limit = int(0.0005 * 1024**3)  # 512 KiB, and uploads of at most 0.0004 GiB (about 410 KiB)
    flags = ("--shared", "--workspace-limit-gb", "0.0005", "--upload-limit-gb", "0.0004")
    with running_app(tmp_path, *flags) as (url, output_dir):
        client = Client(url, verbose=False)
        wait_until_ready(client)
        first = client.predict(
            [handle_file(str(noise_zip(tmp_path / "a.zip", 330, 0)))], api_name="/recaption_upload_zip"
        )
        (workspace,) = (output_dir / "users").iterdir()
        before = tree(workspace)
        with pytest.raises(AppError, match="but your workspace has only .* left: delete datasets"):
            client.predict([handle_file(str(noise_zip(tmp_path / "b.zip", 330, 1)))], api_name="/recaption_upload_zip")
        assert tree(workspace) == before  # nothing of the refused upload

        job = {"prompt": "fill", "width": 128, "height": 128, "num_inference_steps": 1, "batch_size": 4}
        for seed in range(20):  # images until the workspace is at its limit
            if folder_bytes(workspace) >= limit:
                break
            client.predict(**job, seed=seed, api_name="/generate")
        assert folder_bytes(workspace) >= limit
        with pytest.raises(AppError, match="Your workspace is full .* so a new image cannot start"):
            client.predict(**job, seed=99, api_name="/generate")

        client.predict(first[0]["value"], api_name="/recaption_delete_dataset")
        assert not list((workspace / "uploads").iterdir())
        files, _ = client.predict(**job, seed=99, api_name="/generate")
        assert len(files) == 4
