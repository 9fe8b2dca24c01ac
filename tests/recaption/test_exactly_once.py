"""Exactly once, in place: a kill before any one of the run's writes (so also between a caption file and its record)
loses no alt-text and leaves no image marked captioned with its old text; a failed write is a failed image."""

from __future__ import annotations

import shutil

import pytest

from training.progress import ProgressLog
from training.recaption import runner as runner_module
from training.recaption.config import RecaptionConfig
from training.recaption.progress import latest_items, original_captions
from training.recaption.runner import run

from .conftest import write_images
from .fake_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(240)
ALT = {f"img{index:03d}": f"alt text number {index}" for index in range(4)}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except clause of the runner catches a BaseException)."""


def _dataset(folder):
    write_images(folder, len(ALT))
    for key, text in ALT.items():
        (folder / f"{key}.txt").write_text(text)  # the alt-text, which an in-place run overwrites
    return folder


def _config(folder, server) -> RecaptionConfig:
    # In place, .txt sidecars: the captions replace the alt-text files. One request at a time: a fixed write order.
    return RecaptionConfig(inputs=[str(folder)], base_url=server.base_url, concurrency=1, progress_bar=False)


def _kill_at(monkeypatch, target: int) -> list[str]:
    """Make the target-th write of the run (counted over every kind) die before it happens."""
    seen: list[str] = []

    def wrap(name, function):
        def write(*args, **kwargs):
            seen.append(name)
            if len(seen) == target:
                raise Killed
            return function(*args, **kwargs)

        return write

    monkeypatch.setattr(runner_module, "save_original_captions", wrap("snapshot", runner_module.save_original_captions))
    monkeypatch.setattr(runner_module, "write_manifest", wrap("manifest", runner_module.write_manifest))
    monkeypatch.setattr(runner_module, "atomic_write_text", wrap("caption", runner_module.atomic_write_text))
    monkeypatch.setattr(ProgressLog, "write", wrap("record", ProgressLog.write))
    return seen


def _check_invariants(folder) -> None:
    saved = original_captions(folder)
    for key, alt in ALT.items():
        on_disk = (folder / f"{key}.txt").read_text().strip()
        assert on_disk == alt or saved.get(key) == alt, f"{key}: the alt-text is gone"
    for key, record in latest_items(folder).items():
        if record["status"] == "ok":
            assert (folder / f"{key}.txt").read_text().strip() == record["caption"] != ALT[key], key


def test_a_kill_before_any_write_loses_nothing(tmp_path, monkeypatch):
    template = _dataset(tmp_path / "template")
    with FakeOpenAIServer() as server:
        with monkeypatch.context() as patch:  # count the writes of an uninterrupted run
            writes = _kill_at(patch, target=10**6)
            run(_config(shutil.copytree(template, tmp_path / "count"), server))
        assert writes.count("caption") == len(ALT) and "snapshot" in writes
        caption_then_record = [
            i + 2 for i, (a, b) in enumerate(zip(writes, writes[1:])) if (a, b) == ("caption", "record")
        ]
        assert len(caption_then_record) == len(ALT)  # kill points between a caption file and its record
        for target in range(1, len(writes) + 1):
            folder = shutil.copytree(template, tmp_path / f"kill-{target}")
            with monkeypatch.context() as patch:
                _kill_at(patch, target)
                with pytest.raises(Killed):
                    run(_config(folder, server))
            _check_invariants(folder)
            summary = run(_config(folder, server))  # the same command again finishes the job
            assert (summary.captioned, summary.failed, summary.pending) == (len(ALT), 0, 0), target
            _check_invariants(folder)
            for key, record in latest_items(folder).items():
                assert record["original_caption"] == ALT[key], (target, key)
                # The fake captioner repeats the hint it was given: the alt-text, never an earlier caption.
                assert record["caption"].endswith(f"The scene also shows {ALT[key]}."), (target, key)


def test_a_failed_caption_write_is_a_failed_image_with_path_and_reason(tmp_path):
    folder = _dataset(tmp_path / "data")
    (folder / "img001.txt").unlink()
    (folder / "img001.txt").mkdir()  # the caption cannot be written there
    with FakeOpenAIServer() as server:
        summary = run(_config(folder, server))
    assert (summary.captioned, summary.failed) == (3, 1)
    record = latest_items(folder)["img001"]
    assert record["status"] == "failed" and record["reason"].startswith(f"could not write {folder / 'img001.txt'}: ")
