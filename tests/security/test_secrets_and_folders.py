"""Why #1 and #2: the recaption and rewriter endpoints never send a server secret to a client-chosen URL, and no
endpoint reads or writes a server folder the client names (recaption dataset / output / review folders, the Train
tab's data.cache_dir)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import yaml
from app_server_support import poll_until, running_app, wait_until_ready
from gradio_client import Client, handle_file
from PIL import Image

from app.workspace import user_folder_name
from lens_core.metadata import read_settings

from .conftest import CANARY_ENV


def images_zip(path: Path, count: int = 3, prefix: str = "img") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 24), (40 * index % 256, 90, 160)).save(buffer, format="PNG")
            archive.writestr(f"set/{prefix}{index}.png", buffer.getvalue())
    return path


def refused(outcome, *words: str) -> bool:
    """The call failed with a message holding one of `words` (Gradio's own choice check or ours)."""
    return not outcome.success and bool(outcome.error) and any(word in outcome.error for word in words)


def outside_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        Image.new("RGB", (32, 24), (200, 30 * index, 40)).save(folder / f"private{index}.png")
    return folder


# Today's parameter order of /recaption_start (a state, then 15 settings): what an attacker would send.
def legacy_recaption(dataset: Path, output: Path, url: str) -> list:
    return [None, str(dataset), str(output), "openai", "m", "dense", 100, url, CANARY_ENV, 1, 1, "auto", 64,
            ["sidecar"], False, ""]  # fmt: skip


def test_recaption_never_sends_a_secret_to_a_client_url(login_app, space_app, tmp_path):
    dataset = outside_dataset(tmp_path / "server-data")
    for app, user in ((login_app, "bob"), (space_app, None)):
        raw = app.raw(user)
        for api_name in ("recaption_start", "recaption_preview", "recaption_resume"):
            outcome = raw.call(api_name, legacy_recaption(dataset, tmp_path / "out", app.listener.url))
            assert not outcome.success and outcome.error, (api_name, outcome)
            # Today's layout with a URL in every text setting: still no endpoint but the server's.
            current = [None, app.listener.url, app.listener.url, "dense", 100, 1, 1, "auto", 64, ["sidecar"], False, "",
                       ".txt"]  # fmt: skip
            outcome = raw.call(api_name, current)
            assert refused(outcome, "Pick one of your uploaded datasets", "not in the list of choices")
        outcome = raw.call("rewrite_prompt", ["a fox", app.listener.url])
        assert not outcome.success and outcome.error
    assert login_app.listener.requests == [] and space_app.listener.requests == []
    assert not list((tmp_path / "server-data").glob("*.txt")) and not (tmp_path / "out").exists()


def test_server_configured_backends_work_and_keep_their_key(login_app, tmp_path):
    """The positive side: a visitor picks the server's backend by name; its key goes to the server's endpoint."""
    bob = login_app.client("bob")
    dataset, _review = bob.predict(
        [handle_file(str(images_zip(tmp_path / "set.zip")))], api_name="/recaption_upload_zip"
    )
    name = dataset["value"]
    before = len(login_app.endpoint.requests)
    status = bob.predict(name, "house-vlm", "dense", 100, 1, 1, "auto", 64, ["sidecar"], False, "",
                         api_name="/recaption_start")[0]  # fmt: skip
    assert status.startswith("Started: captions go to uploads/")
    text = poll_until(bob, "/recaption_poll", lambda answer: "finished" in answer[0], "recaption")[0]
    assert "3 / 3 images, 3 captioned" in text
    sent = login_app.endpoint.requests[before:]
    assert len(sent) == 3 and all(r["headers"]["Authorization"] == f"Bearer {login_app.endpoint_key}" for r in sent)
    workspace = login_app.workspaces() / user_folder_name("bob")
    assert len(list((workspace / "uploads" / name).rglob("*.txt"))) == 3  # captions next to bob's images only
    rewritten = bob.predict("a fox", "house", api_name="/rewrite_prompt")[0]
    assert rewritten.startswith("A small red square")
    assert login_app.listener.requests == []


def test_no_server_folder_can_be_read_or_written(login_app, space_app, tmp_path):
    outside = outside_dataset(tmp_path / "outside")
    before = sorted(path.name for path in outside.iterdir())
    alice = login_app.raw("alice")
    # Recaption: review an outside folder (today: its captions and images were shown).
    outcome = alice.call("recaption_load_review", [None, str(outside), False])
    assert refused(outcome, "Pick one of your uploaded datasets")
    # Train: the dataset, the base model and data.cache_dir name server paths.
    settings = "\n".join(["model.base_precision=fp32", f"data.cache_dir={tmp_path / 'cache-outside'}"])
    args = [str(outside), "tiny", "24gb", "escape", 5, 1e-3, 4, "", "", settings]
    assert refused(alice.call("train_start", args), "cannot be set")
    args[-1] = ""
    assert refused(alice.call("train_start", args), "Pick one of your uploaded datasets")
    upload = alice.upload(images_zip(tmp_path / "d.zip"))
    name = alice.call("recaption_upload_zip", [None, [upload]]).data[1]["value"]
    for extra, message in (
        (f"data.cache_dir={tmp_path / 'cache-outside'}", "cannot be set"),
        (f"output_dir={tmp_path / 'run-outside'}", "cannot be set"),
        (f"model.path={tmp_path}", "cannot be set"),
    ):
        outcome = alice.call("train_start", [name, "tiny", "24gb", "escape", 5, 1e-3, 4, "", "", extra])
        assert not outcome.success and message in outcome.error, outcome
    outcome = alice.call("train_start", [name, str(tmp_path), "24gb", "escape", 5, 1e-3, 4, "", "", ""])
    assert not outcome.success and "base model is the server's" in outcome.error
    outcome = alice.call("train_load_lora", [str(tmp_path / "x.safetensors")])
    assert not outcome.success and "not one of your LoRAs" in outcome.error
    # A Space without --allow-training refuses training outright.
    outcome = space_app.raw().call("train_start", [name, "tiny", "24gb", "run", 5, 1e-3, 4, "", "", ""])
    assert not outcome.success and "Training is off" in outcome.error
    assert sorted(path.name for path in outside.iterdir()) == before
    assert not (tmp_path / "cache-outside").exists() and not (tmp_path / "run-outside").exists()


def test_the_page_and_images_never_show_where_the_server_keeps_its_model(tiny_checkpoint, tmp_path):
    """A shared server started with `--model /a/server/folder` names its model by the folder's own name only: the
    banner, `/model_status`, the settings `/generate` returns and the PNG's metadata never hold the server path, and a
    model that fails to load is reported without the loader's error (which names server files)."""
    server_folder = str(tiny_checkpoint.parent)
    (tmp_path / "ok").mkdir()
    (tmp_path / "missing").mkdir()
    flags = ("--shared", "--model", str(tiny_checkpoint), "--allow-training", "--train-base", str(tiny_checkpoint))
    with running_app(tmp_path / "ok", *flags) as (url, output_dir):
        client = Client(url, verbose=False)
        wait_until_ready(client)
        status = client.predict(api_name="/model_status")
        assert tiny_checkpoint.name in status and server_folder not in status
        files, settings = client.predict(
            prompt="where is it", seed=3, width=64, height=64, num_inference_steps=2, api_name="/generate"
        )
        assert settings["images"][0]["model"] == tiny_checkpoint.name and server_folder not in str(settings)
        saved = next((output_dir / "users").rglob(Path(files[0]).name))
        assert read_settings(saved).model == tiny_checkpoint.name and server_folder not in saved.read_bytes().decode(
            "latin-1"
        )

        # The Train tab trains the server's base (--train-base) and shows its name; a failed run's message names
        # the visitor's own files relative to their workspace, never the server's folders.
        base_box = next(
            c for c in client.config["components"] if c["props"].get("label") == "Base model (the server's)"
        )
        assert base_box["props"]["value"] == tiny_checkpoint.name
        dataset = client.predict(
            [handle_file(str(images_zip(tmp_path / "small.zip")))], api_name="/recaption_upload_zip"
        )
        name = dataset[0]["value"]
        start = client.predict(name, "", "cpu", "leak", 2, 1e-4, 4, "", "", "", api_name="/train_start")
        (run,) = (output_dir / "users").glob("*/training/leak")
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["path"] == str(tiny_checkpoint)
        assert "leak" in start[0]
        # 32x24 images: too small for any bucket, so the run fails in its preflight
        text = poll_until(client, "/train_status", lambda answer: "failed" in answer[0], "training")[0]
        assert "failed" in text and f"uploads/{name}" in text, text
        assert str(output_dir) not in text and server_folder not in text

    missing = tmp_path / "private-weights" / "Lens-Turbo"
    with running_app(tmp_path / "missing", "--shared", "--model", str(missing), "--local-files-only") as (url, _):
        client = Client(url, verbose=False)
        status = poll_until(client, "/model_status", lambda answer: "Loading" not in answer, "model load")
        assert "No model loaded" in status and str(missing.parent) not in status and "private-weights" not in status


def test_recaption_failures_name_files_relative_to_the_visitors_workspace(space_app, tmp_path):
    """A failure reason (in the progress text and the statistics; here a caption that cannot be written) names the
    file inside the visitor's workspace, not the server folder that workspace lives in."""
    visitor = space_app.client()
    archive = images_zip(tmp_path / "set.zip", count=2)
    with zipfile.ZipFile(archive, "a") as extra:
        extra.writestr("set/broken.png", b"\x89PNG\r\n\x1a\n not really")
        # A folder where img0's caption file would go: writing that caption fails, and the reason names the path.
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 10, 10)).save(buffer, format="PNG")
        extra.writestr("set/img0.txt/inner.png", buffer.getvalue())
    name = visitor.predict([handle_file(str(archive))], api_name="/recaption_upload_zip")[0]["value"]
    visitor.predict(
        name, "house-vlm", "dense", 100, 1, 1, "auto", 64, ["sidecar"], False, "", api_name="/recaption_start"
    )
    outcome = poll_until(visitor, "/recaption_poll", lambda answer: "finished" in answer[0], "recaption")
    text, report = outcome[0], outcome[3]
    assert "4 / 4 images, 2 captioned, 2 failed" in text and report["failed"] == 2, (text, report)
    shown = text + json.dumps(report)
    assert (
        f"could not write uploads/{name}/set/img0.txt" in shown
        and str(space_app.output_dir) not in shown
        and str(space_app.workspaces()) not in shown
    )
