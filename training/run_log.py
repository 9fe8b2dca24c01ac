"""What a training run reports while it runs: progress events (the one format of `training.progress`, tailed by the
Train tab), TensorBoard scalars and an ETA from a moving average of step times.

On resume the events and TensorBoard scalars of the steps after the checkpoint are dropped first (they are redone),
so neither the loss curve nor TensorBoard shows a step twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .progress import PROGRESS_FILE, ProgressLog, truncate_after

logger = logging.getLogger(__name__)


class RunLog:
    """Events of one run into `<output_dir>/progress.jsonl` (and `<output_dir>/logs` for TensorBoard)."""

    def __init__(self, output_dir: Path, max_steps: int, tensorboard: bool, resume_step: int | None = None):
        output_dir = Path(output_dir)
        if resume_step is not None:
            truncate_after(output_dir / PROGRESS_FILE, resume_step)
        self.progress = ProgressLog(output_dir / PROGRESS_FILE)
        self.max_steps = max_steps
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what an earlier run logged at these steps and later, so a resumed run
            # does not draw its redone steps a second time.
            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(output_dir / "logs"), purge_step=purge)
        self._step_seconds: float | None = None
        self._last_time: float | None = None

    def event(self, kind: str, **fields) -> None:
        """Write one event; its loss, lr and val_loss also go to TensorBoard."""
        self.progress.write(kind, **fields)
        if self._writer is not None:
            step = fields.get("step", 0)
            for name in ("loss", "lr", "val_loss"):
                if fields.get(name) is not None:
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
        self.progress.close()
        if self._writer is not None:
            self._writer.close()
