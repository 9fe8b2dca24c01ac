"""One road, end to end, through the app's API (gradio_client against `python app.py --model tiny`): a messy photo
folder with alt-text -> Recaption into a separate folder through a local OpenAI-compatible server -> train a LoRA on
that folder as it is -> "Load in Generate tab" -> the next /generate with the same seed differs from the base image
and its PNG settings name the LoRA. Every wait is on an event the app reports (status text), never on a clock."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from app_server_support import poll_until, running_app, wait_until_ready
from messy_folder import ALT_TEXT, GOOD_KEYS, make_messy_folder
from PIL import Image
from recaption.fake_server import FakeOpenAIServer

from lens_core.metadata import read_settings

pytestmark = pytest.mark.timeout(900)
KEY_ENV, KEY = "E2E_CAPTION_KEY", "sk-e2e-NEVER-WRITTEN-77315"
TRAIN_SETTINGS = """
data.buckets=[[64, 64]]
data.max_upscale=2.0
data.caption_dropout=0
monitor.sample_size=[64, 64]
monitor.sample_steps=2
monitor.sample_every=0
monitor.tensorboard=false
loop.gradient_checkpointing=false
"""


def _generate(client, seed: int, **extra) -> tuple[np.ndarray, Path]:
    files, _info = client.predict(
        prompt="a cat on a sofa, scan of an old negative",
        width=64,
        height=64,
        num_inference_steps=2,
        seed=seed,
        api_name="/generate",
        **extra,
    )
    path = Path(files[0])
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), path


def test_messy_folder_to_a_lora_in_the_generate_tab(tmp_path, monkeypatch):
    from gradio_client import Client

    photos = make_messy_folder(tmp_path / "photos")
    untouched = {path.name: path.read_bytes() for path in photos.iterdir()}
    captions = tmp_path / "captions"
    monkeypatch.setenv(KEY_ENV, KEY)  # the app and its jobs inherit it; it must never be written anywhere
    with FakeOpenAIServer() as server, running_app(tmp_path) as (url, outputs):
        client = Client(url, verbose=False)
        wait_until_ready(client)
        base, _ = _generate(client, seed=11)

        # 1. Recaption into a separate folder (the photos and their alt-text stay as they are).
        client.predict(
            str(photos), str(captions), "openai", "fake-vlm", "dense", 100, server.base_url, KEY_ENV,
            2, 4, "auto", 320, ["sidecar", "jsonl"], False, "",
            api_name="/recaption_start",
        )  # fmt: skip
        status = poll_until(client, "/recaption_poll", lambda a: a[0].startswith("**finished"), "recaption")
        assert status[0].startswith("**finished with failures**: 7 / 7 images, 6 captioned, 1 failed"), status[0]
        assert {path.name: path.read_bytes() for path in photos.iterdir()} == untouched
        rows = {
            Path(r["file_name"]).stem: r
            for r in map(json.loads, (captions / "metadata.jsonl").read_text().splitlines())
        }
        assert sorted(rows) == sorted(GOOD_KEYS)
        for key, row in rows.items():
            assert (captions / row["file_name"]).is_file() and row["original_text"] == ALT_TEXT.get(key, "")
            assert (captions / f"{key}.txt").read_text().strip() == row["text"] != ALT_TEXT.get(key)

        # 2. Train a LoRA on that folder as it is, with the tiny model.
        client.predict(str(captions), "tiny", "cpu", "e2e", 8, 1e-2, 4, "", "", TRAIN_SETTINGS, api_name="/train_start")
        finished = poll_until(client, "/train_status", lambda a: ": done" in a[0] or ": failed" in a[0], "training")
        run = outputs / "training" / "e2e"
        assert ": done" in finished[0], f"{finished[0]}\n{(run / 'train.log').read_text()[-3000:]}"
        report = json.loads((run / "data_report.json").read_text())
        assert (report["caption_source"], report["usable"], report["bad_images"]) == (".txt", len(GOOD_KEYS), [])
        lora_file = Path(finished[3])
        assert lora_file.is_file() and lora_file.is_relative_to(run)

        # 3. Load it in the Generate tab: it is selected there, and the next image uses it.
        message, *slots = client.predict(str(lora_file), api_name="/train_load_lora")
        slots = [slot.get("value") if isinstance(slot, dict) else slot for slot in slots]  # updates carry choices too
        name = lora_file.resolve().relative_to(outputs.resolve()).as_posix()
        assert name in message and slots == [name, "(none)", "(none)", 1.0, 1.0, 1.0]
        styled, styled_path = _generate(client, seed=11)
        assert np.abs(styled - base).max() > 0, "the LoRA did not change the image"
        assert read_settings(styled_path).loras == [{"name": name, "weight": 1.0}]
        # The difference is the LoRA's: the same request without it gives the base image back exactly.
        plain, plain_path = _generate(client, seed=11, loras=[])
        assert np.array_equal(plain, base) and read_settings(plain_path).loras == []

    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert not [path for path in written if KEY.encode() in path.read_bytes()], "the API key was written to a file"
