"""The Recaption tab's handlers without a browser: config building, zip upload, start/stop/resume, review edits."""

from __future__ import annotations

import json
import shutil
import time
import zipfile

import gradio as gr
import pytest

from app.recaption_tab import (
    RecaptionSession,
    accept_unflagged,
    build_config,
    extract_zip,
    load_review,
    poll_job,
    save_edit,
    start_job,
    stop_job,
    use_demo_model,
)

from .conftest import write_images
from .fake_server import FakeOpenAIServer, FakeServerSettings

pytestmark = pytest.mark.timeout(90)


def _values(folder, base_url="http://127.0.0.1:9/v1", **changes):
    values = {
        "inputs": str(folder),
        "output_dir": "",
        "formats": ["sidecar"],
        "backend": "openai",
        "model": "m",
        "base_url": base_url,
        "api_key_env": "OPENAI_API_KEY",
        "concurrency": 1,
        "batch_size": 2,
        "precision": "auto",
        "max_new_tokens": 64,
        "template": "dense",
        "target_words": 100,
        "prompt": "",
        "sidecar_extension": ".txt",
        "overwrite": False,
    }
    return {**values, **changes}


def test_user_mistakes_are_gr_errors(tmp_path):
    with pytest.raises(gr.Error, match="Pick a dataset folder"):
        build_config(_values(""))
    with pytest.raises(gr.Error, match="does not exist"):
        build_config(_values(tmp_path / "nope"))
    with pytest.raises(gr.Error, match="concurrency must be >= 1, got 0"):
        build_config(_values(tmp_path, concurrency=0))
    with pytest.raises(gr.Error, match=r"unknown variable\(s\) \['nme'\]"):
        build_config(_values(tmp_path, prompt="Describe {nme}")).validate()
    with pytest.raises(gr.Error, match="would overwrite that file"):
        build_config(_values(tmp_path, sidecar_extension=".jpg"))  # photo.jpg's caption in photo.jpg
    with pytest.raises(gr.Error, match="No recaption job is running"):
        stop_job(None)


def test_zip_upload_is_extracted_safely(tmp_path):
    images = write_images(tmp_path / "src", 2)
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        for path in images:
            archive.write(path, f"set/{path.name}")
        archive.writestr("set/readme.exe", b"ignored")
    folder = extract_zip(str(good), tmp_path / "root", RecaptionSession())
    assert sorted(path.name for path in (tmp_path / "root").rglob("*.png")) == ["img000.png", "img001.png"]
    assert not list((tmp_path / "root").rglob("*.exe")) and str(tmp_path / "root") in folder
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escaped.png", b"x")
    with pytest.raises(gr.Error, match="unsafe path"):
        extract_zip(str(evil), tmp_path / "root", RecaptionSession())
    assert not (tmp_path / "escaped.png").exists()
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(gr.Error, match="not a valid .zip"):
        extract_zip(str(tmp_path / "fake.zip"), tmp_path / "root", RecaptionSession())


def _wait_until_finished(session):
    deadline = time.monotonic() + 60
    while session.job.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    return poll_job(session)


def test_start_stop_resume_review_and_edit(tmp_path):
    data = tmp_path / "data"
    write_images(data, 12)
    with FakeOpenAIServer(FakeServerSettings(latency=0.15)) as server:
        session, status, _ = start_job(None, _values(data, server.base_url), tmp_path / "app")
        assert "Started" in status
        with pytest.raises(gr.Error, match="already running"):
            start_job(session, _values(data, server.base_url), tmp_path / "app")
        while len(list(data.glob("*.txt"))) < 3:
            time.sleep(0.05)
        assert "Resume" in stop_job(session)
        text, *_ = poll_job(session)
        assert text.startswith("**stopped**")
        stopped_at = len(list(data.glob("*.txt")))
        assert 3 <= stopped_at < 12
        session, _, _ = start_job(
            session, _values(data, server.base_url, overwrite=True), tmp_path / "app", resume=True
        )
        text, thumbs, timer, report, histogram = _wait_until_finished(session)
    assert text.startswith("**finished**: 12 / 12 images, 12 captioned, 0 failed")
    assert len(thumbs) == 8 and report["captioned"] == 12 and histogram.size == (640, 360)
    # Resume never overwrites: only the missing captions were requested.
    assert len(server.requests) <= 12 + 1

    session, rows, dropdown, report, _ = load_review(session, "", False)
    assert [row[0] for row in rows] == [f"img{i:03d}" for i in range(12)]
    rows, message = save_edit(session, "img005", "  A blue square on grey.  ", False)
    assert message == "Saved and accepted img005." and (data / "img005.txt").read_text() == "A blue square on grey.\n"
    edited = next(row for row in rows if row[0] == "img005")
    assert edited[1] == 5 and "too_short" in edited[3] and edited[4] is True
    with pytest.raises(gr.Error, match="is empty"):
        save_edit(session, "img005", "   ", False)
    rows, message = accept_unflagged(session, False)
    assert message == "Accepted 11 unflagged captions." and all(row[4] for row in rows)
    _, flagged_rows, *_ = load_review(session, "", True)
    assert [row[0] for row in flagged_rows] == ["img005"]
    last = json.loads((data / "_lens" / "progress.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "item" and last["accepted"] is True


def test_in_place_with_another_extension_keeps_the_alt_text_and_training_reads_the_new_captions(tmp_path):
    """The tab's "Sidecar extension": `.lens.txt` in place writes the dense captions next to the alt-text `.txt`
    files, which stay as they were, and the training reader (caption_source auto) takes the dense ones."""
    from training.dataset import read_dataset

    data = tmp_path / "data"
    for path in write_images(data, 3):
        path.with_suffix(".txt").write_text(f"my photo {path.stem}\n")
    with FakeOpenAIServer(FakeServerSettings()) as server:
        session, status, _ = start_job(
            None, _values(data, server.base_url, sidecar_extension=".lens.txt"), tmp_path / "app"
        )
        text, *_ = _wait_until_finished(session)
    assert text.startswith("**finished**: 3 / 3 images, 3 captioned"), text
    for index in range(3):
        assert (data / f"img{index:03d}.txt").read_text() == f"my photo img{index:03d}\n"
        assert len((data / f"img{index:03d}.lens.txt").read_text().split()) > 20
    dataset = read_dataset(data)
    assert dataset.caption_source == ".lens.txt" and len(dataset.items) == 3
    assert all(item.caption == (data / f"{item.key}.lens.txt").read_text().strip() for item in dataset.items)


def test_demo_model_runs_through_the_tab(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "app" / "recaption_demo_model")  # built once per session, not per test
    backend, model, max_new_tokens, message = use_demo_model(tmp_path / "app")
    assert backend == "local" and "random" in message
    write_images(tmp_path / "data", 2)
    values = _values(tmp_path / "data", backend="local", model=model, max_new_tokens=max_new_tokens)
    session, _, _ = start_job(None, values, tmp_path / "app")
    text, *_ = _wait_until_finished(session)
    assert text.startswith("**finished**: 2 / 2 images, 2 captioned"), session.job.log_tail()
