"""Captioning backends: ``openai`` (any OpenAI-compatible chat-completions server) and ``local`` (transformers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BackendUnavailableError, CaptionBackend, CaptionJob, CaptionOutcome

if TYPE_CHECKING:
    from ..config import RecaptionConfig

__all__ = ["BackendUnavailableError", "CaptionBackend", "CaptionJob", "CaptionOutcome", "build_backend"]


def build_backend(config: RecaptionConfig) -> CaptionBackend:
    """The backend named by ``config.backend``; the local one imports torch/transformers only when chosen."""
    if config.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend.from_config(config)
    if config.backend == "local":
        from .local_backend import LocalBackend

        return LocalBackend.from_config(config)
    raise ValueError(f"backend={config.backend!r} is not allowed; choose openai or local")
