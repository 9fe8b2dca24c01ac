"""Denoiser precision: fp8 (torchao), int8 and NF4 (bitsandbytes) for the Linear layers of `LensTransformer2DModel`.

The modulation layers (`img_mod`, `txt_mod`), `time_text_embed` and `norm_out.linear` stay in their loaded precision:
quantizing them causes grid artifacts and broken text on Lens-Turbo (LENS_SPEC section 9). The pipeline reads its
compute dtype from `time_text_embed`, so that stays the loaded dtype too.

This is the one quantizer of the project: the app's memory modes and the trainer's frozen base
(`training.base_precision`, QLoRA) both call `quantize_transformer`, with one keep list (`KEEP_IN_HIGH_PRECISION`) and
one int8 threshold (`INT8_OUTLIER_THRESHOLD`), so an adapter is trained against exactly the base it runs on. The fp8
path keeps `nn.Linear` modules (torchao swaps their weight for a float8 tensor), which PEFT wraps for training.

    quantize_transformer(pipe.transformer, "nf4")   # in place; returns the model
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """One denoiser weight format."""

    name: str
    description: str
    package: str | None  # the optional package it needs (None: plain torch)
    install: str | None  # the command that installs it
    needs_cuda: bool
    min_compute_capability: tuple[int, int] | None = None  # e.g. (8, 9) for fp8 matmuls (Ada, Hopper)
    bits_per_weight: float = 16.0  # of a quantized Linear weight, before per-block scales


PRECISIONS: dict[str, Precision] = {
    "none": Precision("none", "Weights as loaded (bf16 on GPU): the reference quality.", None, None, False),
    "fp8": Precision(
        "fp8",
        "fp8 e4m3 weight-only (torchao): weights stored in fp8 with a per-row scale, matmuls in bf16.",
        "torchao",
        "pip install torchao",
        False,
        bits_per_weight=8,
    ),
    "fp8-compute": Precision(
        "fp8-compute",
        "fp8 weights and dynamically quantized fp8 activations (torchao): fp8 tensor-core matmuls.",
        "torchao",
        "pip install torchao",
        True,
        (8, 9),
        bits_per_weight=8,
    ),
    "int8": Precision(
        "int8",
        "int8 weight-only with a per-row scale (bitsandbytes LLM.int8 layers, no outlier split).",
        "bitsandbytes",
        "pip install bitsandbytes",
        False,
        bits_per_weight=8,
    ),
    "nf4": Precision(
        "nf4",
        "4-bit NormalFloat with a scale per 64 weights (bitsandbytes), matmuls in the compute dtype.",
        "bitsandbytes",
        "pip install bitsandbytes",
        False,
        bits_per_weight=4,
    ),
}
# Never quantized: see the module docstring.
KEEP_IN_HIGH_PRECISION = ("img_mod", "txt_mod", "time_text_embed", "norm_out.linear")
# LLM.int8 without the fp16 outlier split (0.0): every weight is stored and multiplied as int8, the memory the
# precision table promises; a split would keep outlier columns in fp16 and differ between machines.
INT8_OUTLIER_THRESHOLD = 0.0


def get_precision(name: str) -> Precision:
    """The `Precision` called `name`; a ValueError lists the known ones."""
    if name not in PRECISIONS:
        raise ValueError(f"Unknown denoiser precision {name!r}; choose one of {list(PRECISIONS)}.")
    return PRECISIONS[name]


def check_precision_available(name: str, device: torch.device | str | None = None) -> Precision:
    """Raise a ValueError saying what is missing (package with its install command, CUDA, compute capability)."""
    precision = get_precision(name)
    if precision.package is not None:
        try:
            __import__(precision.package)
        except ImportError as error:
            raise ValueError(
                f"Denoiser precision {name!r} needs the optional package {precision.package!r}, which is not installed "
                f"({error}). Install it with: {precision.install}"
            ) from error
    device = torch.device(device) if device is not None else None
    if precision.needs_cuda and (device is None or device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"Denoiser precision {name!r} needs a CUDA GPU (device is {device}); use 'fp8' or 'none'.")
    if precision.min_compute_capability is not None:
        capability = torch.cuda.get_device_capability(device)
        if capability < precision.min_compute_capability:
            wanted = ".".join(map(str, precision.min_compute_capability))
            raise ValueError(
                f"Denoiser precision {name!r} needs fp8 tensor cores (compute capability >= {wanted}: Ada or Hopper); "
                f"this GPU has {capability[0]}.{capability[1]}. Use 'fp8' (weight-only) instead."
            )
    return precision


def quantizable_linear_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` layers that are quantized (everything but the high-precision patterns)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(pattern in name for pattern in KEEP_IN_HIGH_PRECISION)
    ]


def quantize_transformer(model: nn.Module, precision: str, device: torch.device | str | None = None) -> nn.Module:
    """Quantize `model`'s Linear layers in place (except KEEP_IN_HIGH_PRECISION) and return it.

    `device`: where the quantized weights live (bitsandbytes quantizes while moving there); default: where they are.
    A model that was already quantized is rejected rather than quantized twice.
    """
    spec = check_precision_available(precision, device if device is not None else _model_device(model))
    if getattr(model, "lens_precision", "none") != "none":
        raise ValueError(
            f"The denoiser is already quantized to {model.lens_precision!r}; load it again to change that."
        )
    if spec.name == "none":
        return model
    names = quantizable_linear_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layers to quantize.")
    device = torch.device(device) if device is not None else _model_device(model)
    compute_dtype = model.time_text_embed.timestep_embedder.linear_1.weight.dtype
    if spec.name in ("fp8", "fp8-compute"):
        _quantize_torchao(model, spec.name, set(names), device)
    else:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _bitsandbytes_linear(getattr(parent, child), spec.name, compute_dtype, device))
    model.lens_precision = spec.name
    logger.info("Quantized %d denoiser Linear layers to %s", len(names), spec.name)
    return model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _quantize_torchao(model: nn.Module, name: str, names: set[str], device: torch.device) -> None:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    config = (
        Float8WeightOnlyConfig() if name == "fp8" else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    )
    for module_name in names:  # quantize on the target device, one layer at a time (no full-size copy there)
        model.get_submodule(module_name).to(device)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)


def _bitsandbytes_linear(linear: nn.Linear, name: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights; bitsandbytes quantizes them while moving them to `device`."""
    import bitsandbytes as bnb

    weight = linear.weight.data.detach().to("cpu", compute_dtype)  # [out, in]; quantization happens in `.to(device)`
    bias = linear.bias
    with torch.device("meta"):  # the placeholders are replaced below; do not allocate them
        if name == "int8":
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
            )
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                quant_storage=torch.uint8,
            )
    if name == "int8":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", quant_storage=torch.uint8)
    if bias is not None:
        layer.bias = nn.Parameter(bias.data.detach().to("cpu"), requires_grad=False)
    return layer.to(device)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) weight really occupies: its storage plus its scales."""
    if hasattr(tensor, "qdata"):  # torchao Float8Tensor: fp8 data + float32 scales
        return tensor_bytes(tensor.qdata) + tensor_bytes(tensor.scale)
    total = tensor.numel() * tensor.element_size()
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes NF4: absmax per 64 weights
    if quant_state is not None:
        total += quant_state.absmax.numel() * quant_state.absmax.element_size()
    scales = getattr(tensor, "SCB", None)  # bitsandbytes int8: one scale per row
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    return total


def module_weight_bytes(model: nn.Module) -> int:
    """Bytes held by `model`'s parameters and buffers, quantized ones counted as stored."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor_bytes(t) for t in tensors)
