"""Run ``python -m training.recaption`` as a child process and follow it: what the UI (or a script) uses.

The job gets its own process group so Stop reaches every worker; its config and log live in a job folder the caller
owns, and its progress is read back from ``progress.jsonl`` in the run's output folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RecaptionConfig
from .progress import progress_path, read_events
from .runner import resolve_output_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def command_for(config_path: Path) -> list[str]:
    """The command line that runs a config file."""
    return [sys.executable, "-m", "training.recaption", "--config", str(config_path), "--no-progress-bar"]


@dataclass
class RecaptionJob:
    """One started run: its process, config and where its files are."""

    config: RecaptionConfig
    job_dir: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def output_dir(self) -> Path:
        return resolve_output_dir(self.config)

    @property
    def log_path(self) -> Path:
        return self.job_dir / "recaption.log"

    @classmethod
    def start(cls, config: RecaptionConfig, job_dir: Path) -> RecaptionJob:
        """Write the config into ``job_dir`` and start the run in a new process group."""
        config.validate()
        job_dir.mkdir(parents=True, exist_ok=True)
        config_path = job_dir / "recaption_config.json"
        config.to_json_file(config_path)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        with (job_dir / "recaption.log").open("ab") as log:
            process = subprocess.Popen(
                command_for(config_path),
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(config=config, job_dir=job_dir, process=process)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the process group (the run records 'stopped'), then SIGKILL whatever is left after the grace time."""
        if not self.running():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.1)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout=timeout) if self.process else 0

    def events(self) -> list[dict[str, Any]]:
        """Every progress event so far (all runs into this output folder)."""
        return read_events(progress_path(self.output_dir, *self.config.shard_position()))

    def log_tail(self, characters: int = 2000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-characters:]
        except FileNotFoundError:
            return ""
