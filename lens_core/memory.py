"""Memory modes: where the Lens components live and in which precision, named and chosen by card size.

`MEMORY_MODES` is the one table; `apply_memory_mode(pipe, mode)` returns the pipeline ready to run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryMode:
    """One named placement / precision recipe."""

    name: str
    description: str
    target: str  # the card it is meant for
    needs_cuda: bool


MEMORY_MODES: dict[str, MemoryMode] = {
    "full": MemoryMode("full", "Everything resident on the device; fastest.", "40 GB+ cards, or CPU", needs_cuda=False),
    "balanced": MemoryMode(
        "balanced",
        "Denoiser and VAE resident; the text encoder is moved to the GPU only while encoding (features are small).",
        "24 GB cards",
        needs_cuda=True,
    ),
    "low": MemoryMode("low", "diffusers model CPU offload: one component on the GPU at a time.", "12-16 GB cards", needs_cuda=True),
    "minimal": MemoryMode(
        "minimal", "Sequential offload: weights stream to the GPU layer by layer; slowest.", "8 GB cards", needs_cuda=True
    ),
}
AUTO = "auto"


def choose_memory_mode() -> str:
    """Pick the largest mode that fits the free VRAM (CPU machines get `full`)."""
    if not torch.cuda.is_available():
        return "full"
    free_bytes, _total = torch.cuda.mem_get_info()
    free_gb = free_bytes / 2**30
    if free_gb >= 40:
        return "full"
    if free_gb >= 22:
        return "balanced"
    if free_gb >= 11:
        return "low"
    return "minimal"


def apply_memory_mode(pipe, mode: str = AUTO, device: str | torch.device | None = None):
    """Place `pipe`'s components as `mode` says and return it. `auto` chooses from the free VRAM."""
    if mode == AUTO:
        mode = choose_memory_mode()
        logger.info("Memory mode auto -> %s", mode)
    if mode not in MEMORY_MODES:
        raise ValueError(f"Unknown memory mode {mode!r}; choose one of {[AUTO, *MEMORY_MODES]}.")
    spec = MEMORY_MODES[mode]
    if spec.needs_cuda and not torch.cuda.is_available():
        raise ValueError(f"Memory mode {mode!r} needs a CUDA GPU and none is available; use 'full' on this machine.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if mode == "full":
        pipe.to(device)
    elif mode == "balanced":
        pipe.transformer.to(device)
        pipe.vae.to(device)
        pipe.text_encoder.to("cpu")
    elif mode == "low":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "minimal":
        pipe.enable_sequential_cpu_offload(device=device)
    pipe.memory_mode = mode
    return pipe
