"""The one job layer of the app's long jobs (Recaption and Train tabs): start, follow, stop, resume, reap.

A job is `python -m <module> ...` started from the repository root in its **own process group** (so closing the app
does not kill it and Stop reaches every worker it spawned), with its output in `<job_dir>/<log>` and its state in
`<job_dir>/job.json` (pid, command, progress file, how to resume, exit code). Any later `Job.attach(job_dir)` - another
request, another session, a restarted app - follows the same process.

- **stop** sends SIGTERM to the group (the job finishes its current step, records 'stopped' and exits 130), and
  SIGKILL to the group when it is still running after the grace period; it returns at once.
- **resume** starts the recorded command again with the job's resume arguments (`--resume latest` for training; a
  recaption run resumes by itself).
- **reap**: a thread waits for every child this process starts, so a finished job never lingers as a zombie, and
  writes its exit code into job.json.
- progress is read with the one reader of `training.progress`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from lens_core.atomic_io import atomic_write_text

from .progress import PROGRESS_FILE, read_events

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_FILE = "job.json"
DEFAULT_GRACE_SECONDS = 30.0
_children: dict[int, subprocess.Popen] = {}  # the jobs this process started, by pid
_children_lock = threading.Lock()


@dataclass
class Job:
    """One job: its folder, command, progress file and (once started) its process id."""

    job_dir: Path
    command: list[str]
    progress_path: Path
    resume_arguments: list[str] = field(default_factory=list)
    log_name: str = "job.log"
    pid: int | None = None
    create_time: float | None = None  # the process's start time: a reused pid is not mistaken for the job
    exit_code_recorded: int | None = None
    stop_requested: float | None = None  # when Stop was pressed (the job may take a step to react)

    # ---- starting ------------------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        module: str,
        arguments: list[str],
        job_dir: str | Path,
        progress_path: str | Path,
        *,
        resume_arguments: list[str] | tuple[str, ...] = (),
        log_name: str = "job.log",
    ) -> Job:
        """Launch `python -m module arguments...` in its own process group; returns the running job."""
        job = cls(
            Path(job_dir),
            [sys.executable, "-m", module, *arguments],
            Path(progress_path),
            list(resume_arguments),
            log_name,
        )
        job._launch(job.command)
        return job

    @classmethod
    def attach(cls, job_dir: str | Path) -> Job | None:
        """The job recorded in `job_dir/job.json`, or None when there is none."""
        path = Path(job_dir) / JOB_FILE
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        values["job_dir"], values["progress_path"] = Path(values["job_dir"]), Path(values["progress_path"])
        return cls(**values)

    def _launch(self, command: list[str]) -> None:
        if self.running():
            raise ValueError(f"A job is already running in {self.job_dir} (pid {self.pid}); stop it first.")
        self.job_dir.mkdir(parents=True, exist_ok=True)
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        with (self.job_dir / self.log_name).open("ab") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own session and process group: Stop reaches its workers too
            )
        self.pid, self.exit_code_recorded, self.stop_requested = process.pid, None, None
        self.create_time = _create_time(process.pid)
        with _children_lock:
            _children[process.pid] = process
        self._save()
        threading.Thread(target=self._reap, args=(process,), name=f"reap-{process.pid}", daemon=True).start()

    def _reap(self, process: subprocess.Popen) -> None:
        code = process.wait()  # collects the exit status: no zombie
        latest = Job.attach(self.job_dir)
        if latest is not None and latest.pid == process.pid:
            latest.exit_code_recorded = code
            latest._save()
        logger.info("Job %s (pid %d) ended with exit code %d", " ".join(self.command[2:4]), process.pid, code)

    def _save(self) -> None:
        values = asdict(self)
        values["job_dir"], values["progress_path"] = str(self.job_dir), str(self.progress_path)
        atomic_write_text(self.job_dir / JOB_FILE, json.dumps(values, indent=2))

    # ---- following -----------------------------------------------------------------------------------------------

    def running(self) -> bool:
        """Whether the job's process is alive (a finished child is reaped, never counted as running)."""
        if self.pid is None:
            return False
        with _children_lock:
            process = _children.get(self.pid)
        if process is not None:
            return process.poll() is None
        try:
            other = psutil.Process(self.pid)
            same = self.create_time is None or abs(other.create_time() - self.create_time) < 1.0
            return same and other.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def exit_code(self) -> int | None:
        """The exit code once the job has ended (None while it runs, or when another app started it and it left none)."""
        with _children_lock:
            process = _children.get(self.pid) if self.pid is not None else None
        if process is not None:
            return process.poll()
        latest = Job.attach(self.job_dir)
        return latest.exit_code_recorded if latest is not None else self.exit_code_recorded

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the job ends (or `timeout` seconds pass: `subprocess.TimeoutExpired`); returns the exit code."""
        with _children_lock:
            process = _children.get(self.pid) if self.pid is not None else None
        if process is not None:
            return process.wait(timeout=timeout)
        try:
            psutil.Process(self.pid).wait(timeout=timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            raise subprocess.TimeoutExpired(self.command, timeout) from None
        return self.exit_code()

    def events(self) -> list[dict[str, Any]]:
        """Every progress event the job has written so far."""
        return read_events(self.progress_path)

    def log_tail(self, characters: int = 2000) -> str:
        """The end of the job's console output."""
        try:
            return (self.job_dir / self.log_name).read_text(encoding="utf-8", errors="replace")[-characters:]
        except FileNotFoundError:
            return ""

    # ---- stopping and resuming -------------------------------------------------------------------------------------

    def stop(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> bool:
        """SIGTERM the job's process group now and SIGKILL it if it still runs after `grace_seconds`; returns at
        once, False when nothing was running."""
        if not self.running():
            return False
        pid = self.pid
        _signal_group(pid, signal.SIGTERM)
        self.stop_requested = time.time()
        self._save()

        def kill_if_still_running() -> None:
            if self.wait_quietly(grace_seconds):
                return
            logger.warning("Job pid %d ignored SIGTERM for %.0f s: killing its process group", pid, grace_seconds)
            _signal_group(pid, signal.SIGKILL)

        threading.Thread(target=kill_if_still_running, name=f"stop-{pid}", daemon=True).start()
        return True

    def wait_quietly(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the job to end; True when it did."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def resume(self) -> Job:
        """Start the job's command again with its resume arguments (the job must not be running)."""
        self._launch([*self.command, *self.resume_arguments])
        return self


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # the group id is the leader's pid (start_new_session)


START_EVENTS = ("start", "starting", "started", "resumed")


def job_state(job: Job | None, final_events: dict[str, str]) -> str:
    """'not started', 'running', 'stopping' or how the latest run ended, from the process and the progress events.

    `final_events` maps a job's final event kinds to states (e.g. {'done': 'done', 'stopped': 'stopped'}); a run that
    started and wrote none of them was killed."""
    if job is None or job.pid is None:
        return "not started"
    if job.running():
        return "stopping" if job.stop_requested else "running"
    for event in reversed(job.events()):
        kind = event.get("event")
        if kind in final_events:
            return final_events[kind]
        if kind in START_EVENTS:
            break
    return "killed"


# ---------------------------------------------------------------------------------------------------------------------
# Training jobs
# ---------------------------------------------------------------------------------------------------------------------

TRAIN_CONFIG_FILE = "config.yaml"  # what `python -m training.train` also writes, so one resume command fits both
TRAIN_FINAL_EVENTS = {"done": "done", "stopped": "stopped", "error": "failed"}


def _training_job(output_dir: Path) -> Job:
    """The job of a run folder: `python -m training.train --config <run>/config.yaml`, resumed with --resume latest."""
    return Job(
        output_dir,
        [sys.executable, "-m", "training.train", "--config", str(output_dir / TRAIN_CONFIG_FILE)],
        output_dir / PROGRESS_FILE,
        ["--resume", "latest"],
        "train.log",
    )


def start_training(output_dir: str | Path, values: dict, overrides: dict | None = None) -> Job:
    """Check the config (a ValueError before anything starts), write `<output_dir>/config.yaml`, start the run."""
    from .config import build_config

    output_dir = Path(output_dir)
    existing = Job.attach(output_dir)
    if existing is not None and existing.running():
        raise ValueError(f"A training process is already running in {output_dir} (pid {existing.pid}); stop it first.")
    config = build_config(values, dict(overrides or {}, output_dir=str(output_dir)))
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / TRAIN_CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    job = _training_job(output_dir)
    job._launch(job.command)
    return job


def resume_training(output_dir: str | Path) -> Job:
    """Continue the run in `output_dir` from its newest checkpoint, with its saved config (also a run that was
    started from the command line, which has no job.json)."""
    output_dir = Path(output_dir)
    if not (output_dir / TRAIN_CONFIG_FILE).is_file():
        raise ValueError(f"{output_dir} has no {TRAIN_CONFIG_FILE}: there is no run to resume there.")
    return (Job.attach(output_dir) or _training_job(output_dir)).resume()


@dataclass
class TrainingStatus:
    """What a run folder says about its job, for the Train tab."""

    state: str  # "not started", "running", "stopping", "stopped", "done", "failed", "killed"
    step: int = 0
    max_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    eta_s: float | None = None
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    data_summary: str = ""  # what the pre-load check found in the dataset


def _data_summary(event: dict) -> str:
    skipped = [
        f"{event[key]} {label}"
        for key, label in (
            ("bad_images", "unreadable"),
            ("missing_captions", "without caption"),
            ("too_small", "too small"),
        )
        if event.get(key)
    ]
    text = f"{event.get('usable_images', 0)} images"
    return text + (f" ({', '.join(skipped)} skipped: see data_report.json)" if skipped else "")


def training_status(output_dir: str | Path) -> TrainingStatus:
    """Summarise a run folder's progress events and its process."""
    job = Job.attach(output_dir)
    status = TrainingStatus(state=job_state(job, TRAIN_FINAL_EVENTS))
    for event in read_events(Path(output_dir) / PROGRESS_FILE):
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
        elif kind in TRAIN_FINAL_EVENTS:
            status.message, status.outputs = event.get("message", ""), event.get("outputs", {})
        elif kind in START_EVENTS:
            status.message, status.outputs = "", {}
            if kind == "starting":
                status.data_summary = _data_summary(event)
    if status.state == "killed":
        status.message = "The process ended without finishing; Resume continues from the last checkpoint."
    elif status.state == "stopping":
        status.message = "Stopping at the end of the current step (a checkpoint is written)."
    return status


# ---------------------------------------------------------------------------------------------------------------------
# Recaption jobs
# ---------------------------------------------------------------------------------------------------------------------

RECAPTION_FINAL_EVENTS = {"end": "finished", "stopped": "stopped"}


def start_recaption(config, job_dir: str | Path) -> Job:
    """Write a `RecaptionConfig` into `job_dir` and start the run (which resumes what is already captioned)."""
    from .recaption.progress import progress_path
    from .recaption.runner import resolve_output_dir

    config.validate()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    config_path = job_dir / "recaption_config.json"
    config.to_json_file(config_path)
    progress = progress_path(resolve_output_dir(config), *config.shard_position())
    arguments = ["--config", str(config_path), "--no-progress-bar"]
    return Job.start("training.recaption", arguments, job_dir, progress, log_name="recaption.log")
