"""Storing the frozen base denoiser for adapter training in the precision the app runs it in.

`freeze_base(transformer, precision, device)` freezes every weight and keeps the base in fp32 or bf16, or quantizes it
with `lens_core.quantization.quantize_transformer`: the function, keep list (`KEEP_IN_HIGH_PRECISION`) and int8
threshold the app's memory modes use, so a QLoRA is trained against exactly the base it later runs on.

- fp8: torchao float8 e4m3 weight-only with per-row scales; the Linear modules stay `nn.Linear` (their weight becomes
  a torchao tensor), so PEFT wraps them with its torchao LoRA layer (merging is not supported there; training and
  inference never merge). On Ada / Hopper cards it saves half the bf16 memory with no visible loss.
- int8 (LLM.int8 layers without outlier split) and nf4 (4-bit NormalFloat): bitsandbytes layers, which PEFT wraps
  natively (QLoRA).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lens_core.quantization import quantize_transformer

logger = logging.getLogger(__name__)

QUANTIZED_BASES = ("fp8", "nf4", "int8")  # the `lens_core.quantization` precisions a base can be trained over


def freeze_base(transformer: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """Freeze every base weight and store it in `precision` (fp32, bf16, fp8, int8, nf4) on `device`; returns the
    transformer (modified in place)."""
    if precision not in ("fp32", "bf16", *QUANTIZED_BASES):
        raise ValueError(
            f"model.base_precision must be one of fp32, bf16, {', '.join(QUANTIZED_BASES)}; got {precision!r}."
        )
    transformer.requires_grad_(False)
    if precision == "fp32":
        return transformer.to(device=device, dtype=torch.float32)
    transformer.to(device=device, dtype=torch.bfloat16)
    if precision in QUANTIZED_BASES:
        quantize_transformer(transformer, precision, device)
        transformer.requires_grad_(False)  # quantized layers arrive frozen; say it once for all
    return transformer
