"""Storing the frozen base denoiser in bf16, fp8 or 4/8-bit for LoRA training (QLoRA).

`freeze_base(transformer, precision)` is the one entry point. The modulation, timestep and output-norm layers always
stay in bf16 (LENS_SPEC section 9: quantized modulation layers cause artifacts). The lead may later point this at
`lens_core.quantization`; it is kept here so training depends on nothing still being written.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BASE_PRECISIONS = ("fp32", "bf16", "fp8", "nf4", "int8")
KEEP_HIGH_PRECISION = ("img_mod", "txt_mod", "time_text_embed", "norm_out", "img_in", "txt_in", "proj_out")


class Float8FrozenLinear(nn.Linear):
    """A frozen Linear whose weight is stored as float8 (e4m3) with one scale per output row; it is dequantized to
    the input's dtype on every call. Still an `nn.Linear`, so PEFT wraps it like any other (PEFT's torchao path
    accepts only int8 weights, which is why fp8 storage is done here in plain PyTorch)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8FrozenLinear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # [out, in]
        scale = (
            weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
        )  # [out, 1]
        module.weight = nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        module.register_buffer(
            "weight_scale", scale.to(torch.bfloat16 if linear.weight.dtype == torch.bfloat16 else torch.float32)
        )
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)  # [out, in]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def _quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not any(part in name for part in KEEP_HIGH_PRECISION)


def _replace(transformer: nn.Module, build) -> int:
    targets = [(name, module) for name, module in transformer.named_modules() if _quantizable(name, module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name) if parent_name else transformer, child, build(module))
    return len(targets)


def _bitsandbytes_linear(precision: str, device: torch.device):
    import bitsandbytes as bnb

    def build(linear: nn.Linear) -> nn.Module:
        if precision == "nf4":
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                linear.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4"
            )
        else:
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
            )
            layer.weight = bnb.nn.Int8Params(
                linear.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
            )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.to(torch.bfloat16), requires_grad=False)
        return layer.to(device)  # bitsandbytes quantizes when the weight moves to the GPU

    return build


def freeze_base(transformer: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """Freeze every base weight and store it in `precision`; returns the transformer (modified in place)."""
    if precision not in BASE_PRECISIONS:
        raise ValueError(f"model.base_precision must be one of {list(BASE_PRECISIONS)}, got {precision!r}.")
    transformer.requires_grad_(False)
    if precision == "fp32":
        return transformer.to(device=device, dtype=torch.float32)
    transformer.to(device=device, dtype=torch.bfloat16)
    if precision == "fp8":
        count = _replace(transformer, Float8FrozenLinear.from_linear)
        logger.info("Stored %d frozen Linear weights as float8 e4m3 (modulation layers stay bf16).", count)
    elif precision in ("nf4", "int8"):
        if device.type != "cuda":
            raise ValueError(
                f"model.base_precision {precision!r} needs a CUDA GPU (bitsandbytes); on this "
                f"{device.type} machine use fp32, bf16 or fp8."
            )
        count = _replace(transformer, _bitsandbytes_linear(precision, device))
        logger.info("Quantized %d frozen Linear layers to %s with bitsandbytes.", count, precision)
    return transformer
