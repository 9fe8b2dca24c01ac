"""What a run checks before it loads a model, how it stops (Ctrl-C: at the next step, checkpoint, exit 130), and
TensorBoard after a resume (no step drawn twice)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from train_helpers import make_toy_dataset, tiny_overrides

from training.config import build_config
from training.data import DatasetError
from training.progress import read_progress
from training.run_log import RunLog
from training.trainer import LensTrainer

REPO = Path(__file__).resolve().parents[2]
NEVER_LOADED = "nobody/never-loaded"  # a Hub id: loading it would fail offline, so an error naming it means a load


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("preflight-data"), copies=2)


def _run(tmp_path, data, resume=None, **changes):
    values = tiny_overrides(NEVER_LOADED, data, tmp_path / "run", 2, **changes)
    LensTrainer(build_config({}, values)).run(resume=resume)


def test_bad_setups_fail_before_any_model_is_loaded(dataset, tmp_path):
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    (uncaptioned / "a.png").write_bytes((dataset / "pattern0_0.png").read_bytes())
    with pytest.raises(DatasetError, match="None of the 1 images .* has a caption"):
        _run(tmp_path, uncaptioned)
    with pytest.raises(DatasetError, match="does not exist"):
        _run(tmp_path, tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no checkpoint yet, so there is nothing to resume"):
        _run(tmp_path, dataset, resume="latest")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        _run(tmp_path, dataset, output_dir=str(blocker / "run"))
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        _run(tmp_path, dataset, **{"model.path": str(not_a_model)})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="loop.fsdp=true shards the model over CUDA GPUs"):
            _run(tmp_path, dataset, **{"loop.fsdp": True})


def test_bad_images_are_reported_and_too_many_stop_the_run(dataset, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in sorted(dataset.iterdir()):
        (folder / source.name).write_bytes(source.read_bytes())
    for index in range(2):
        (folder / f"broken{index}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (folder / f"broken{index}.txt").write_text("a broken photo")
    with pytest.raises(DatasetError, match=r"2 of 6 captioned images are unreadable \(33%"):
        _run(tmp_path, folder, **{"data.max_bad_fraction": 0.25})
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["usable"] == 4 and sorted(Path(b["source"]).name for b in report["bad_images"]) == [
        "broken0.jpg",
        "broken1.jpg",
    ]
    assert all("not an image" in b["reason"] or "corrupt" in b["reason"] for b in report["bad_images"])


def test_command_line_errors_are_one_message_and_a_clear_exit_code(dataset, tmp_path):
    command = [sys.executable, "-m", "training.train", "--model", NEVER_LOADED, "--output-dir", str(tmp_path / "o")]
    result = subprocess.run([*command, "--data", str(tmp_path / "nothing")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    events = read_progress(tmp_path / "o")
    assert events[-1]["event"] == "error" and "does not exist" in events[-1]["message"]
    result = subprocess.run(
        [*command, "--data", str(dataset), "--set", "loop.max_stpes=3"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2 and "Did you mean 'loop.max_steps'?" in result.stderr


def _stop_a_run(values: dict, tmp_path: Path, ready, signum: int) -> list[dict]:
    """Run `python -m training.train` on `values`, send `signum` once `ready(events)` holds, expect exit 130; returns
    the run's events."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(build_config({}, values).to_dict()))
    command = [sys.executable, "-m", "training.train", "--config", str(config_file)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Wait for the event in the progress file, however long the machine takes.
        wait_until(lambda: ready(read_progress(tmp_path / "run")), process)
        process.send_signal(signum)
        assert process.wait(timeout=120) == 130, process.stderr.read().decode()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    return read_progress(tmp_path / "run")


def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_and_exit_130(tiny_checkpoint, dataset, tmp_path):
    values = tiny_overrides(tiny_checkpoint, dataset, tmp_path / "run", 100_000, **{"monitor.checkpoint_every": 10_000})
    events = _stop_a_run(values, tmp_path, lambda events: sum(e["event"] == "step" for e in events) >= 2, signal.SIGINT)
    last_step = max(e["step"] for e in events if e["event"] == "step")
    assert events[-1]["event"] == "stopped" and events[-1]["step"] == last_step and events[-1]["checkpoint"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{last_step:06d}" / "state.json").is_file()


def test_a_stop_during_the_first_samples_ends_at_the_next_denoising_step(tiny_checkpoint, dataset, tmp_path):
    # The longest samples allowed (200 steps at 512x512): the stop must interrupt the sampler, or "samples" is logged.
    values = tiny_overrides(
        tiny_checkpoint,
        dataset,
        tmp_path / "run",
        10,
        **{"monitor.sample_steps": 200, "monitor.sample_size": [512, 512]},
    )
    # SIGTERM is what the Train tab's Stop sends.
    events = _stop_a_run(values, tmp_path, lambda events: any(e["event"] == "started" for e in events), signal.SIGTERM)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "stopped" and "samples" not in kinds and "step" not in kinds


def wait_until(condition, process: subprocess.Popen) -> None:
    """Return once `condition()` holds; fail if the process ends first. Polls the files it reads, never a clock."""
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) first: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)


def test_tensorboard_after_a_resume_shows_every_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, 10, tensorboard=True)
    for step in range(1, 9):  # the first run got to step 8, its last checkpoint was step 5
        log.step(step, 1.0 / step, 1e-4)
    log.close()
    log = RunLog(tmp_path, 10, tensorboard=True, resume_step=5)
    for step in range(6, 11):
        log.step(step, 2.0 / step, 1e-4)
    log.close()
    accumulator = EventAccumulator(str(tmp_path / "logs"))
    accumulator.Reload()
    scalars = accumulator.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, 11))
    assert scalars[6].value == pytest.approx(2.0 / 7)  # the redone step, not the old one
    assert [e["step"] for e in read_progress(tmp_path) if e["event"] == "step"] == list(range(1, 11))


def test_a_config_that_does_not_fit_the_gpu_is_refused_before_any_weight_is_read(tiny_checkpoint, tmp_path):
    """On a GPU the preflight compares the simulated peak of the config with the card, from the checkpoint's
    config.json files alone (this folder has no weights at all), and names the preset that fits."""
    from training.preflight import run_preflight

    folder = tmp_path / "Lens-configs-only"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_bytes((tiny_checkpoint / "model_index.json").read_bytes())
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "LensTransformer2DModel"}))
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):  # large enough for the preset's buckets
        Image.new("RGB", (768, 768), (90 * index, 120, 200)).save(photos / f"p{index}.png")
        (photos / f"p{index}.txt").write_text(f"a flat colour field number {index}")
    values = {"preset": "24gb", "model.path": str(folder), "data.path": str(photos), "output_dir": str(tmp_path / "r")}
    config = build_config({}, values)
    with pytest.raises(ValueError, match=r"needs about 1\d\.\d GiB .* but the GPU has 12\.0 GiB: use --preset 12gb"):
        run_preflight(config, None, gpu_gib=12.0)
    assert run_preflight(config, None, gpu_gib=80.0).plan.report.usable > 0  # fits: the other checks go on
    assert run_preflight(config, None, gpu_gib=None).plan.report.usable > 0  # no GPU: nothing to compare
