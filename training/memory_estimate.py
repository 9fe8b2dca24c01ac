"""A rough peak-memory estimate for a training config, used to refuse runs that cannot fit the detected GPU.

The estimate adds the frozen base (by precision), the trained weights with their gradients and optimizer state, and
the activations of the largest bucket (all 48 blocks' inputs with gradient checkpointing, full block activations
without). It is deliberately simple; measured figures are in BENCHMARKS.md (`python -m training.bench_memory`).
"""

from __future__ import annotations

import copy
import logging

import torch

from .config import PRESET_ORDER, PRESETS, TrainConfig, _apply, _nest
from .data import bucket_list

logger = logging.getLogger(__name__)

BYTES_PER_BASE_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "nf4": 0.55}
# fp32 weight + fp32 grad + optimizer state per trained parameter.
BYTES_PER_TRAINED = {"adamw": 16.0, "adamw8bit": 10.0, "adafactor": 8.5}
TEXT_TOKENS = 512
CUDA_OVERHEAD_GB = 1.5
REAL_DIM, REAL_LAYERS = 1536, 48


def estimate_peak_gb(config: TrainConfig, base_parameters: int) -> float:
    """Estimated peak GPU memory in GiB for `config` on a denoiser with `base_parameters` weights."""
    base = base_parameters * BYTES_PER_BASE_WEIGHT[config.model.base_precision]
    if config.adapter.method == "full":
        trained = base_parameters * BYTES_PER_TRAINED[config.optimizer.name] - base
    else:
        # A rank-r adapter on the default targets of the real model: 48 blocks x 10 layers x r x (in + out).
        per_rank = REAL_LAYERS * (4 * (1536 + 4608) + 4 * (1536 + 1536) + 6 * (1536 + 4096)) // 2
        trained = per_rank * config.adapter.rank * BYTES_PER_TRAINED[config.optimizer.name]
    width, height = max(bucket_list(config.data.buckets), key=lambda b: b[0] * b[1])
    tokens = (width // 16) * (height // 16) + TEXT_TOKENS
    per_block = tokens * REAL_DIM * 2 * config.loop.batch_size  # one bf16 hidden state
    # ~30 hidden-state-sized tensors live inside one block during its backward pass.
    activations = per_block * (REAL_LAYERS + 30) if config.loop.gradient_checkpointing else per_block * 30 * REAL_LAYERS
    return (base + trained + activations) / 2**30 + CUDA_OVERHEAD_GB


def fitting_preset(config: TrainConfig, base_parameters: int, total_gb: float) -> str | None:
    """The largest card preset whose estimate fits `total_gb`, applied over `config`."""
    best = None
    for name in PRESET_ORDER:
        trial = copy.deepcopy(config)
        _apply(trial, _nest(PRESETS[name]))
        if estimate_peak_gb(trial, base_parameters) <= total_gb:
            best = name
    return best


def fit_problem(config: TrainConfig, base_parameters: int, total_gb: float) -> str | None:
    """None when `config` is estimated to fit a `total_gb` card; else the message, naming the preset that fits."""
    need = estimate_peak_gb(config, base_parameters)
    if need <= total_gb:
        return None
    preset = fitting_preset(config, base_parameters, total_gb)
    advice = (
        f"use --preset {preset}" if preset else "no preset fits this card; use data.buckets=lens-512 and adapter.rank=8"
    )
    return f"This config needs about {need:.1f} GiB but the GPU has {total_gb:.1f} GiB: {advice}."


def check_fits_device(config: TrainConfig, base_parameters: int, device: torch.device) -> None:
    """On CUDA: refuse a config whose estimate exceeds the card, naming the preset that fits."""
    if device.type != "cuda":
        return
    total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    logger.info("Estimated peak memory %.1f GiB on a %.1f GiB GPU", estimate_peak_gb(config, base_parameters), total_gb)
    problem = fit_problem(config, base_parameters, total_gb)
    if problem:
        raise ValueError(problem)
