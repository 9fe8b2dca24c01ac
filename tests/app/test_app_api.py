"""The running app driven through gradio_client, as an API user would: generate, restore from PNG, bad input, two
clients at once, the rewriter, the gallery, a full queue, cancel and authentication."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from app_server_support import poll_until, running_app, wait_for_status, wait_until_ready
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image, PngImagePlugin

from lens_core.metadata import ImageSettings, read_settings, save_png

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def restore(client: Client, path: Path) -> dict:
    """Call /restore_settings and name its outputs."""
    names = [
        "prompt",
        "negative_prompt",
        "variant",
        "aspect",
        "width",
        "height",
        "steps",
        "guidance",
        "seed_mode",
        "seed",
        "rewritten",
        "use_rewritten",
        "status",
    ]
    values = client.predict(handle_file(str(path)), api_name="/restore_settings")
    return {
        name: value.get("value") if isinstance(value, dict) else value
        for name, value in zip(names, values, strict=True)
    }


def test_generate_returns_saved_files_and_settings(client, app_server):
    files, info = client.predict(prompt="a red fox in snow", seed=7, api_name="/generate", **SMALL)
    (downloaded,) = files
    saved = app_server[1] / "images" / Path(downloaded).name
    assert saved.is_file()
    settings = read_settings(saved)
    assert (settings.prompt, settings.seed, settings.num_inference_steps, settings.width) == (
        "a red fox in snow",
        7,
        2,
        64,
    )
    assert (settings.variant, settings.guidance_scale, settings.model) == ("Lens-Turbo", 1.0, "tiny")
    assert info["seed"] == 7 and info["images"][0]["prompt"] == "a red fox in snow"
    assert Image.open(saved).info["parameters"].startswith("a red fox in snow\n")  # the A1111 chunk


def test_variant_defaults_and_random_seed(client):
    _files, info = client.predict(prompt="a fox", variant="Lens", width=64, height=64, api_name="/generate")
    image = info["images"][0]
    assert (image["variant"], image["num_inference_steps"], image["guidance_scale"]) == ("Lens", 20, 5.0)
    assert 0 <= info["seed"] < 2**32


def test_restore_from_our_png_and_from_a1111(client, app_server, tmp_path):
    ours = tmp_path / "ours.png"
    save_png(
        Image.new("RGB", (8, 8)),
        ours,
        ImageSettings(
            prompt="a blue teapot",
            negative_prompt="blurry",
            seed=42,
            num_inference_steps=20,
            guidance_scale=4.5,
            width=832,
            height=1248,
            variant="Lens",
        ),
    )
    restored = restore(client, ours)
    assert (restored["prompt"], restored["negative_prompt"], restored["seed"], restored["seed_mode"]) == (
        "a blue teapot",
        "blurry",
        42,
        "Fixed",
    )
    assert (restored["variant"], restored["width"], restored["height"], restored["steps"], restored["guidance"]) == (
        "Lens",
        832,
        1248,
        20,
        4.5,
    )
    assert restored["aspect"].startswith("2:3")

    a1111 = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a castle, masterpiece\nNegative prompt: ugly\nSteps: 30, Sampler: DPM++ 2M, "
        "CFG scale: 7, Seed: 123, Size: 512x768, Model: sdxl",
    )
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    restored = restore(client, a1111)
    assert (restored["prompt"], restored["negative_prompt"], restored["seed"]) == ("a castle, masterpiece", "ugly", 123)
    assert (restored["width"], restored["height"], restored["steps"], restored["aspect"]) == (
        512,
        768,
        30,
        "Custom size",
    )


def test_restore_rejects_corrupt_and_foreign_pngs(client, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    bad_json = tmp_path / "bad.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("lens", "{not json")
    Image.new("RGB", (8, 8)).save(bad_json, pnginfo=info)
    for path, message in (
        (corrupt, "not a readable image"),
        (plain, "carries no generation settings"),
        (bad_json, "corrupt JSON"),
    ):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(path)), api_name="/restore_settings")
    assert "ready" in client.predict(api_name="/model_status")  # still serving


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"width": 72}, "multiple of 16"),
        ({"width": 4096}, "from 64 to 2560"),
        ({"height": "tall"}, "whole number"),
        ({"height": 64.5}, "whole number"),
        ({"num_inference_steps": 1000}, "from 1 to 200"),
        ({"guidance_scale": 99}, "from 0 to 30"),
        ({"seed": 2**40}, "seed must be"),
        ({"variant": "Lens-XL"}, "Unknown Lens variant"),
        ({"batch_size": 0}, "batch_size"),
        ({"loras": [{"name": "missing.safetensors", "weight": 1}]}, "Unknown LoRA"),
        ({"loras": "not a list"}, "loras must be a list"),
    ],
)
def test_bad_api_values_get_clear_errors(client, changes, message):
    with pytest.raises(Exception, match=message):
        client.predict(api_name="/generate", **{"prompt": "a fox", **SMALL, **changes})


def test_two_clients_at_once_get_their_own_images_in_order(app_server):
    clients = [Client(app_server[0], verbose=False) for _ in range(2)]
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]  # interleaved submissions from the two clients
    jobs = {}
    for index, repeat in order:
        jobs[(index, repeat)] = clients[index].submit(
            prompt=f"client {index} image {repeat}", seed=100 * index + repeat, api_name="/generate", **SMALL
        )
        # Until the server has it queued (or already ran it): so the queue receives them in this order.
        wait_for_status(jobs[(index, repeat)], Status.IN_QUEUE, Status.PROCESSING, Status.ITERATING, Status.FINISHED)
    counters = []
    for key in order:
        files, info = jobs[key].result(timeout=120)
        settings = read_settings(app_server[1] / "images" / Path(files[0]).name)
        assert (settings.prompt, settings.seed) == (f"client {key[0]} image {key[1]}", 100 * key[0] + key[1])
        assert info["images"][0]["prompt"] == settings.prompt
        counters.append(int(Path(files[0]).name.split("-")[2]))  # the engine's per-process file counter
    assert counters == sorted(counters)  # one GPU worker, first come first served


def test_rewriter_endpoint(client):
    rewritten, use_it, status = client.predict("a cat", "openai", api_name="/rewrite_prompt")
    assert rewritten == "A vivid, detailed a cat." and use_it is True and "original prompt" in status
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("  ", "openai", api_name="/rewrite_prompt")


def test_gallery_lists_saved_images(client, app_server):
    client.predict(prompt="gallery check", seed=5, api_name="/generate", **SMALL)
    items, count = client.predict(api_name="/list_gallery")
    assert any("gallery-check" in Path(item["image"]).name for item in items)
    assert "image(s)" in count


def test_reuse_seed_and_variant_defaults(client):
    mode, seed = client.predict(1234, api_name="/reuse_seed")
    assert (mode, seed) == ("Fixed", 1234)
    steps, guidance, negative = client.predict("Lens-Turbo", api_name="/variant_defaults")
    assert steps == 4 and guidance["visible"] is False and negative["visible"] is False
    steps, guidance, _ = client.predict("Lens-Base", api_name="/variant_defaults")
    assert steps == 50 and guidance["value"] == 5.0 and guidance["visible"] is True
    assert client.predict("16:9  ·  1376x768", api_name="/aspect_size") == (1376, 768)


def test_full_queue_cancel_and_auth(tmp_path):
    """A second app: a queue of 1 behind a login. While a job runs one may wait and the next is refused; Cancel
    stops only the canceller's own job."""
    with running_app(tmp_path, "--queue-size", "1", "--auth", "ann:pw1") as (url, _output_dir):
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises its own types for a refused login)
            Client(url, verbose=False)
        first, second, third = (Client(url, auth=("ann", "pw1"), verbose=False) for _ in range(3))
        wait_until_ready(first)
        running = first.submit(prompt="running", width=512, height=512, num_inference_steps=80, api_name="/generate")
        wait_for_status(running, Status.PROCESSING)
        waiting = second.submit(prompt="waiting", seed=1, api_name="/generate", **SMALL)
        wait_for_status(waiting, Status.IN_QUEUE)
        assert waiting.status().rank == 0  # the user is told their position
        with pytest.raises(Exception, match="[Qq]ueue is full"):
            third.submit(prompt="refused", api_name="/generate", **SMALL).result(timeout=60)
        assert running.result(timeout=120)[1]["images"][0]["prompt"] == "running"
        assert waiting.result(timeout=120)[1]["images"][0]["prompt"] == "waiting"

        # Cancel: the first user's long job stops at its next step; the second user's next job is not affected.
        long_job = first.submit(prompt="long", width=512, height=512, num_inference_steps=200, api_name="/generate")
        wait_for_status(long_job, Status.PROCESSING)
        started = time.monotonic()
        first.predict(api_name="/cancel")  # (through the queue for API clients: it must not be full)
        other = second.submit(prompt="other", seed=2, api_name="/generate", **SMALL)
        with pytest.raises(Exception, match="Cancelled"):
            long_job.result(timeout=120)
        assert time.monotonic() - started < 15  # 200 steps would take far longer
        assert other.result(timeout=120)[1]["images"][0]["prompt"] == "other"


def test_the_app_stays_up_after_errors(client):
    with pytest.raises(Exception):  # noqa: B017
        client.predict(api_name="/generate", prompt="")
    files, _ = client.predict(prompt="still here", api_name="/generate", **SMALL)
    assert files


def test_without_weights_the_page_explains_and_offers_the_demo_model(tmp_path):
    missing = tmp_path / "no-lens-here"
    with running_app(tmp_path, "--model", str(missing), "--local-files-only") as (url, _output_dir):
        client = Client(url, verbose=False)
        status = poll_until(client, "/model_status", lambda answer: "loading" not in answer.lower(), "model load")
        assert "No model loaded" in status and "no-lens-here" in status and "--model" in status
        with pytest.raises(Exception, match="No model loaded"):
            client.predict(prompt="a fox", api_name="/generate", **SMALL)
        banner = client.predict(api_name="/load_demo_model")[0]
        assert "tiny" in banner and "ready" in banner
        files, _ = client.predict(prompt="a fox", api_name="/generate", **SMALL)
        assert files


def test_personal_mode_checks_typed_folders(client, tmp_path):
    """The person at the machine may name server folders, and a mistyped one is named back clearly."""
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(Exception, match="does not exist"):
        client.predict(str(missing), "tiny", "24gb", "run", 5, 1e-4, 4, "", "", "", api_name="/train_start")
    file = tmp_path / "a-file.txt"
    file.write_text("not a folder")
    recaption = [str(tmp_path), str(file), "openai", "m", "dense", 100, "http://127.0.0.1:9/v1", "KEY", 1, 1, "auto", 64,
                 ["sidecar"], False, ""]  # fmt: skip
    with pytest.raises(Exception, match="is not a writable folder"):
        client.predict(*recaption, api_name="/recaption_start")
    with pytest.raises(Exception, match="does not exist or is not a folder"):
        client.predict(str(missing), *recaption[1:], api_name="/recaption_start")
