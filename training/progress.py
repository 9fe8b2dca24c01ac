"""Progress reporting: JSON lines in `<output>/progress.jsonl` (what the Train tab tails), TensorBoard, and an ETA."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lens_core.atomic_io import atomic_write_text

logger = logging.getLogger(__name__)
PROGRESS_FILE = "progress.jsonl"


class ProgressLog:
    """Appends one JSON object per event; flushed line by line so a reader never sees half an event."""

    def __init__(self, output_dir: Path, max_steps: int, tensorboard: bool):
        self.path = Path(output_dir) / PROGRESS_FILE
        self.max_steps = max_steps
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(output_dir) / "logs"))
        self._step_seconds: float | None = None
        self._last_time: float | None = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop events from steps after the checkpoint (they will be redone), atomically."""
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def event(self, kind: str, **fields) -> None:
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = fields.get("step", 0)
            for name in ("loss", "lr", "val_loss"):
                if name in fields:
                    self._writer.add_scalar(f"train/{name}", fields[name], step)
            self._writer.flush()

    def step(self, step: int, loss: float, lr: float) -> None:
        """A finished optimizer step, with an ETA from a moving average of step times."""
        now = time.monotonic()
        if self._last_time is not None:
            elapsed = now - self._last_time
            self._step_seconds = elapsed if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * elapsed
        self._last_time = now
        eta = None if self._step_seconds is None else round(self._step_seconds * (self.max_steps - step), 1)
        self.event("step", step=step, loss=loss, lr=lr, eta_s=eta, max_steps=self.max_steps)
        if step % 10 == 0 or step == self.max_steps:
            logger.info("step %d/%d loss %.5f lr %.2e eta %s s", step, self.max_steps, loss, lr, eta)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_progress(output_dir: str | Path) -> list[dict]:
    """Every complete event of a run (a half-written last line is ignored)."""
    path = Path(output_dir) / PROGRESS_FILE
    events = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
