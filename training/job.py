"""Running `python -m training.train` as its own process and following it: what the Train tab drives.

A job is a run folder. `start` writes the config there and launches the process (in its own session, so closing the
app does not kill it); `stop` sends SIGTERM, which makes the trainer checkpoint and exit; `resume` relaunches with
`--resume latest`; `status` summarises `progress.jsonl` (losses, validation, samples, ETA, state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import build_config
from .progress import read_progress

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_FILE = "job.json"


@dataclass
class JobStatus:
    """What a run folder says about its job."""

    state: str  # "not started", "running", "stopped", "done", "failed", "killed"
    step: int = 0
    max_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    eta_s: float | None = None
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


class TrainingJob:
    """One run folder and the process training into it."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    @property
    def config_path(self) -> Path:
        return self.output_dir / "run.yaml"

    def _pid(self) -> int | None:
        path = self.output_dir / JOB_FILE
        return json.loads(path.read_text()).get("pid") if path.is_file() else None

    def is_running(self) -> bool:
        pid = self._pid()
        return pid is not None and _alive(pid)

    def _launch(self, extra: list[str]) -> int:
        if self.is_running():
            raise ValueError(
                f"A training process is already running in {self.output_dir} (pid {self._pid()}); stop it first."
            )
        log = (self.output_dir / "train.log").open("a")
        command = [sys.executable, "-m", "training.train", "--config", str(self.config_path), *extra]
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (self.output_dir / JOB_FILE).write_text(json.dumps({"pid": process.pid, "command": command}))
        self._process = process  # keep a handle so the child is reaped when it ends
        return process.pid

    def start(self, values: dict, overrides: dict | None = None) -> int:
        """Check the config (errors raise ValueError before anything starts), write it, launch; returns the pid."""
        overrides = dict(overrides or {}, output_dir=str(self.output_dir))
        config = build_config(values, overrides)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return self._launch([])

    def resume(self) -> int:
        """Continue from the newest checkpoint with the saved config."""
        if not self.config_path.is_file():
            raise ValueError(f"{self.output_dir} has no run.yaml: there is no run to resume there.")
        return self._launch(["--resume", "latest"])

    def stop(self) -> bool:
        """Ask the process to checkpoint and exit (SIGTERM); False when nothing is running."""
        pid = self._pid()
        if pid is None or not _alive(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        return True

    def status(self) -> JobStatus:
        events = read_progress(self.output_dir)
        status = JobStatus(state="not started")
        for event in events:
            kind, step = event.get("event"), event.get("step", 0)
            status.step = max(status.step, step)
            status.max_steps = event.get("max_steps", status.max_steps)
            if kind == "step":
                status.losses.append((step, event["loss"]))
                status.eta_s = event.get("eta_s")
            elif kind == "validation" and event.get("val_loss") is not None:
                status.validation.append((step, event["val_loss"]))
            elif kind == "samples":
                status.samples = event.get("paths", [])
            elif kind in ("done", "stopped", "error"):
                status.state = {"done": "done", "stopped": "stopped", "error": "failed"}[kind]
                status.message = event.get("message", "")
                status.outputs = event.get("outputs", {})
            elif kind in ("started", "resumed"):
                status.state = "running"
        if status.state == "running" and not self.is_running():
            status.state = "killed"
            status.message = "The process ended without finishing; resume continues from the last checkpoint."
        elif self.is_running():
            status.state = "running"
        return status
