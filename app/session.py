"""Per-browser-session values (kept in `gr.State`), and the ZeroGPU decorator for GPU handlers."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable


class SessionState:
    """One user's state: the cancel event of their current job. Gradio deep-copies a State's initial value for each
    session; an Event cannot be copied, so a copy is simply a fresh state."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.last_seed: int | None = None
        self.running = False  # a job of this session is on the GPU now

    def new_job(self) -> threading.Event:
        """A fresh cancel event for the job being submitted (an old cancel must not stop a new job)."""
        self.cancel = threading.Event()
        return self.cancel

    def __deepcopy__(self, memo) -> SessionState:
        return SessionState()


def gpu_task(duration: Callable[..., int]) -> Callable:
    """`spaces.GPU(duration=...)` when the `spaces` package is installed (Hugging Face ZeroGPU), else no change.

    `duration` gets the handler's arguments and returns the seconds of GPU time to reserve."""
    if importlib.util.find_spec("spaces") is None:
        return lambda function: function
    import spaces

    return spaces.GPU(duration=duration)
