"""Kill a real training process after a checkpoint, resume it with --resume latest, and compare with an
uninterrupted run: same seed, so the resumed losses equal the uninterrupted ones step for step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import make_toy_dataset, tiny_overrides

from training.checkpoint import list_checkpoints
from training.config import build_config
from training.progress import read_progress
from training.trainer import LensTrainer

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _config_values(checkpoint, data, output):
    values = tiny_overrides(
        checkpoint,
        data,
        output,
        STEPS,
        **{
            "monitor.checkpoint_every": 5,
            "data.caption_dropout": 0.3,
            "optimizer.learning_rate": 1e-3,
            "optimizer.scheduler": "cosine",
            "optimizer.warmup_steps": 5,
            "loop.ema_decay": 0.9,
            "data.validation_count": 1,
            "monitor.validate_every": 15,
        },
    )
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _losses(output: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_progress(output) if e["event"] == "step"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("resume-data"), copies=2, sidecars=False)


def test_killed_run_resumes_without_a_jump(tiny_checkpoint, dataset, tmp_path):
    reference_dir = tmp_path / "reference"
    LensTrainer(build_config(_config_values(tiny_checkpoint, dataset, reference_dir))).run()
    reference = _losses(reference_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "killed"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_config_values(tiny_checkpoint, dataset, run_dir)))
    command = [sys.executable, "-m", "training.train", "--config", str(config_file)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not list_checkpoints(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not any(e["event"] == "done" for e in read_progress(run_dir)), "the run finished before it was killed"
    killed_at = int(list_checkpoints(run_dir)[-1].name.split("-")[1])

    result = subprocess.run([*command, "--resume", "latest"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_progress(run_dir)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == killed_at < STEPS
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, STEPS + 1))  # lost steps were redone, none duplicated in the log
    resumed_losses = _losses(run_dir)
    for step in range(1, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-6), f"step {step}"
    validation = [e["val_loss"] for e in events if e["event"] == "validation"]
    reference_validation = [e["val_loss"] for e in read_progress(reference_dir) if e["event"] == "validation"]
    assert validation == pytest.approx(reference_validation, rel=1e-4)
    assert all((c / "state.json").is_file() for c in list_checkpoints(run_dir))
    assert (run_dir / "lora" / "lens-lora.safetensors").is_file()
