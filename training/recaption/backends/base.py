"""What every backend takes and returns: a ``CaptionJob`` in, a ``CaptionOutcome`` out (caption or error)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


@dataclass
class CaptionJob:
    """One image to caption: decoding is deferred to ``load_image`` so backends can run it in their workers."""

    key: str
    prompt: str
    load_image: Callable[[], Image.Image]
    payload: Any = None  # the runner's own data, passed through untouched
    notes: list[str] = field(default_factory=list)  # filled by load_image (e.g. 'CMYK converted to RGB')


@dataclass
class CaptionOutcome:
    """The answer for one job: ``caption`` on success, else ``error`` with the reason."""

    job: CaptionJob
    caption: str | None = None
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0


class BackendUnavailableError(RuntimeError):
    """The backend cannot serve any request (bad key, unknown model, server down): stop the run instead of failing
    every remaining image one by one."""


class CaptionBackend(Protocol):
    """A captioner: yields one outcome per job, in any order, keeping at most a bounded number in flight."""

    name: str

    def caption_many(self, jobs: Iterable[CaptionJob]) -> Iterator[CaptionOutcome]: ...

    def close(self) -> None: ...
