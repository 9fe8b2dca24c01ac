"""Memory modes: where the Lens components live and in which precision, named and chosen by card size.

`MEMORY_MODES` is the one table (README's table is generated from it); `apply_memory_mode(pipe, mode)` returns the
pipeline ready to run; `run_with_oom_guard(fn, mode)` turns a CUDA out-of-memory into an error naming the next
smaller mode, after freeing what the failed call allocated.

The building blocks, usable on their own:
- `PinnedOffload`: keeps a module's tensors in (pinned) CPU memory and copies them to the GPU on demand.
- `enable_encoder_swap` / `enable_encoder_streaming`: the whole GPT-OSS encoder, or one decoder layer at a time,
  is on the GPU only while it runs (the features it returns are small).
- `quantize_transformer` (in `lens_core.quantization`): fp8 / int8 / NF4 denoiser.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from .quantization import check_precision_available, get_precision, quantize_transformer

logger = logging.getLogger(__name__)

AUTO = "auto"
ENCODER_PLACEMENTS = ("resident", "swap", "stream", "model_offload")
TRANSFORMER_PLACEMENTS = ("resident", "model_offload", "group_offload")


@dataclass(frozen=True)
class MemoryMode:
    """One named placement / precision recipe. GB figures are estimates for 1024x1024 until BENCHMARKS.md has them."""

    name: str
    description: str
    target: str  # the card it is meant for
    transformer_precision: str  # a key of lens_core.quantization.PRECISIONS
    encoder_placement: str  # resident | swap (whole, while encoding) | stream (layer by layer) | model_offload
    transformer_placement: str  # resident | model_offload (diffusers) | group_offload (block by block)
    vae_tile_px: int | None  # the VAE decodes in tiles of this many pixels (None: in one piece)
    needs_cuda: bool  # False: also runs on CPU, where moving between CPU and GPU memory is a no-op
    min_free_vram_gb: float  # what `auto` and the fit check require
    max_ram_gb: float  # system RAM the mode needs at most (bf16 weights held in CPU memory, with headroom)


MEMORY_MODES: dict[str, MemoryMode] = {
    mode.name: mode
    for mode in (
        MemoryMode(
            "full",
            "Everything resident on the GPU in the loaded precision (bf16); the fastest exact mode.",
            "32 GB and larger (RTX 5090, A100, H100), or CPU",
            "none",
            "resident",
            "resident",
            None,
            needs_cuda=False,
            min_free_vram_gb=26,
            max_ram_gb=8,
        ),
        MemoryMode(
            "fast",
            "Like full, with fp8 activation+weight matmuls in the denoiser (torchao); close to bf16, "
            "not identical. Needs fp8 tensor cores.",
            "24 GB+ Ada / Hopper (RTX 4090, L40S, H100)",
            "fp8-compute",
            "resident",
            "resident",
            None,
            needs_cuda=True,
            min_free_vram_gb=21,
            max_ram_gb=8,
        ),
        MemoryMode(
            "balanced",
            "bf16 denoiser and VAE resident; the text encoder waits in pinned CPU memory and is on "
            "the GPU only while it encodes a new prompt; the VAE decodes images above 1024 px in tiles.",
            "24 GB (RTX 3090 / 4090)",
            "none",
            "swap",
            "resident",
            1024,
            needs_cuda=False,
            min_free_vram_gb=20,
            max_ram_gb=16,
        ),
        MemoryMode(
            "low",
            "bf16 denoiser resident; the text encoder streams from pinned CPU memory one layer at a "
            "time (a few hundred MB on the GPU); VAE in 512 px tiles. Same latents as full.",
            "12-16 GB (RTX 3060 12 GB, 4070, 4080)",
            "none",
            "stream",
            "resident",
            512,
            needs_cuda=False,
            min_free_vram_gb=11,
            max_ram_gb=16,
        ),
        MemoryMode(
            "minimal",
            "NF4 denoiser (modulation layers, time embedding and output norm kept in bf16) "
            "resident; text encoder streamed; VAE in 512 px tiles.",
            "8 GB (RTX 3070, 4060)",
            "nf4",
            "stream",
            "resident",
            512,
            needs_cuda=False,
            min_free_vram_gb=6.5,
            max_ram_gb=18,
        ),
        MemoryMode(
            "offload",
            "diffusers model CPU offload: one whole component (encoder, denoiser, VAE) on the GPU "
            "at a time, moved per generation; bf16; VAE in 512 px tiles.",
            "16 GB (RTX 4060 Ti 16 GB, 4080)",
            "none",
            "model_offload",
            "model_offload",
            512,
            needs_cuda=True,
            min_free_vram_gb=13,
            max_ram_gb=24,
        ),
        MemoryMode(
            "sequential",
            "bf16 denoiser offloaded block by block (diffusers group offload with CUDA streams); "
            "text encoder streamed; VAE in 512 px tiles. Slowest, smallest.",
            "6 GB and smaller cards",
            "none",
            "stream",
            "group_offload",
            512,
            needs_cuda=True,
            min_free_vram_gb=3,
            max_ram_gb=24,
        ),
    )
}
# `auto` and the "next smaller mode" advice walk this order (fast and offload are opt-in alternatives).
SIZE_ORDER = ("full", "balanced", "low", "minimal", "sequential")


class LensOutOfMemoryError(ValueError):
    """The GPU ran out of memory in a generation; the message names the next smaller memory mode."""


def get_memory_mode(name: str) -> MemoryMode:
    """The mode called `name`; a ValueError lists the known ones."""
    if name not in MEMORY_MODES:
        raise ValueError(f"Unknown memory mode {name!r}; choose one of {[AUTO, *MEMORY_MODES]}.")
    return MEMORY_MODES[name]


def next_smaller_mode(name: str) -> str | None:
    """The mode after `name` in SIZE_ORDER (fast -> balanced, offload -> sequential), None after the smallest."""
    start = {"fast": "full", "offload": "minimal"}.get(name, name)
    index = SIZE_ORDER.index(start)
    return SIZE_ORDER[index + 1] if index + 1 < len(SIZE_ORDER) else None


# ----------------------------------------------------------------------------------------------------------------
# Hardware
# ----------------------------------------------------------------------------------------------------------------


def usable_vram_gb(device: torch.device | None = None) -> float:
    """GB this process could use on `device`: free memory plus what torch already holds, within any per-process cap."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        usable = min(usable, fraction(device) * total)
    return usable / 2**30


def total_ram_gb() -> float:
    """System RAM installed, in GB (what a mode's `max_ram_gb` is compared with)."""
    import psutil

    return psutil.virtual_memory().total / 2**30


def pick_memory_mode(vram_gb: float, ram_gb: float) -> str:
    """The largest mode in SIZE_ORDER whose GPU need fits `vram_gb` and whose CPU-memory need fits `ram_gb`."""
    for name in SIZE_ORDER:
        mode = MEMORY_MODES[name]
        if mode.min_free_vram_gb <= vram_gb and mode.max_ram_gb <= ram_gb:
            return name
    raise ValueError(
        f"No memory mode fits {vram_gb:.1f} GB of usable GPU memory and {ram_gb:.1f} GB of system RAM: "
        + "; ".join(
            f"{n} needs {MEMORY_MODES[n].min_free_vram_gb} GB GPU + {MEMORY_MODES[n].max_ram_gb} GB RAM"
            for n in SIZE_ORDER
        )
        + ". Run on CPU with --device cpu."
    )


def choose_memory_mode(device: torch.device | str | None = None) -> str:
    """`auto`: the largest mode that fits the usable VRAM and the system RAM (CPU machines get `full`)."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "full"
    vram = usable_vram_gb(device if device is not None and device.index is not None else None)
    return pick_memory_mode(vram, total_ram_gb())


def check_mode_fits(mode: MemoryMode, device: torch.device) -> None:
    """Raise a ValueError when `mode` cannot work on `device`, naming the mode that would."""
    if device.type != "cuda":
        if mode.needs_cuda:
            raise ValueError(
                f"Memory mode {mode.name!r} needs a CUDA GPU and the device is {device}; "
                f"use 'full', 'balanced', 'low' or 'minimal' here."
            )
        return
    vram = usable_vram_gb(device if device.index is not None else None)
    if vram < mode.min_free_vram_gb:
        fitting = [name for name in SIZE_ORDER if MEMORY_MODES[name].min_free_vram_gb <= vram]
        advice = f"{fitting[0]!r} fits this GPU" if fitting else "no mode fits it; run on CPU with --device cpu"
        raise ValueError(
            f"Memory mode {mode.name!r} needs about {mode.min_free_vram_gb} GB of GPU memory but only "
            f"{vram:.1f} GB is usable; {advice}."
        )
    check_precision_available(mode.transformer_precision, device)
    ram = total_ram_gb()
    if ram < mode.max_ram_gb:
        logger.warning(
            "Memory mode %s may need up to %.0f GB of system RAM; this machine has %.1f GB.",
            mode.name,
            mode.max_ram_gb,
            ram,
        )


# ----------------------------------------------------------------------------------------------------------------
# Placement building blocks
# ----------------------------------------------------------------------------------------------------------------


class PinnedOffload:
    """Keeps `module`'s parameters and buffers in CPU memory (pinned when CUDA is present, for fast async copies)
    and swaps device copies in and out by replacing `.data`, so the CPU copy is made once and never re-allocated."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, torch.device(device)
        pin = torch.cuda.is_available() and self.device.type == "cuda"
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live tensor, its CPU home)
        self.is_onloaded = False
        seen = set()
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            home = tensor.data.to("cpu")
            if pin:
                home = home.pin_memory()
            tensor.data = home
            self.tensors.append((tensor, home))

    def onload(self) -> None:
        """Copy every tensor to the device (asynchronously from pinned memory)."""
        for tensor, home in self.tensors:
            tensor.data = home.to(self.device, non_blocking=True)
        self.is_onloaded = True

    def offload(self) -> None:
        """Point every tensor back at its CPU copy; the device copies are freed."""
        for tensor, home in self.tensors:
            tensor.data = home
        self.is_onloaded = False

    def num_bytes(self) -> int:
        return sum(home.numel() * home.element_size() for _tensor, home in self.tensors)


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _attach_offload(module: nn.Module, device: torch.device) -> PinnedOffload:
    """Onload `module` (and move its inputs) right before it runs; offload it right after."""
    offload = PinnedOffload(module, device)

    def before(_module, args, kwargs):
        offload.onload()
        return _to_device(args, offload.device), _to_device(kwargs, offload.device)

    def after(_module, _args, _kwargs, output):
        offload.offload()
        return output

    module.register_forward_pre_hook(before, with_kwargs=True)
    # always_call: an error inside (a CUDA out-of-memory, say) still sends the weights back to CPU memory.
    module.register_forward_hook(after, with_kwargs=True, always_call=True)
    return offload


def enable_encoder_swap(encoder: nn.Module, device: torch.device) -> PinnedOffload:
    """The whole encoder lives in CPU memory and is on `device` only while it encodes."""
    _check_not_placed(encoder)
    offload = _attach_offload(encoder, device)
    encoder.lens_placement, encoder.lens_offloads = "swap", [offload]
    logger.info("Text encoder swapped in while encoding (%.2f GB in CPU memory)", offload.num_bytes() / 2**30)
    return offload


def enable_encoder_streaming(encoder: nn.Module, device: torch.device) -> list[PinnedOffload]:
    """Each decoder layer is copied to `device` right before it runs and dropped after: the GPU holds one layer.

    The token embedding (1.2 GB on the real model) stays in CPU memory: a lookup there costs nothing, and only the
    [B, S, 2880] hidden states travel; the first layer's hook moves them.
    """
    _check_not_placed(encoder)
    encoder.to("cpu")  # embedding and rotary tables stay here; each layer's hook moves its inputs to `device`
    offloads = [_attach_offload(layer, device) for layer in encoder.model.layers]
    encoder.lens_placement, encoder.lens_offloads = "stream", offloads
    total = sum(offload.num_bytes() for offload in offloads)
    logger.info("Text encoder streamed layer by layer (%d layers, %.2f GB in CPU memory)", len(offloads), total / 2**30)
    return offloads


def _check_not_placed(module: nn.Module) -> None:
    placement = getattr(module, "lens_placement", None)
    if placement is not None:
        raise ValueError(f"The text encoder is already set up as {placement!r}; load the pipeline again to change it.")


# ----------------------------------------------------------------------------------------------------------------
# The entry points
# ----------------------------------------------------------------------------------------------------------------


def apply_memory_mode(
    pipe, mode: str = AUTO, device: str | torch.device | None = None, transformer_precision: str | None = None
):
    """Place and quantize `pipe`'s components as `mode` says and return the pipeline, ready to run.

    `auto` picks the largest mode that fits the usable GPU memory. `transformer_precision` overrides the mode's
    denoiser precision (e.g. "int8" for `minimal` on a card where NF4 is slow). A pipeline takes one mode: to change
    it, load it again (quantization and hooks are not undone).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if mode == AUTO:
        mode = choose_memory_mode(device)
        logger.info("Memory mode auto -> %s", mode)
    spec = get_memory_mode(mode)
    precision = get_precision(transformer_precision or spec.transformer_precision).name
    if getattr(pipe, "memory_mode", None) is not None:
        raise ValueError(
            f"This pipeline is already in memory mode {pipe.memory_mode!r}; load it again to use {mode!r}."
        )
    if spec.transformer_placement == "group_offload" and precision != "none":
        raise ValueError(
            f"Memory mode {mode!r} streams the denoiser block by block in its loaded precision; "
            f"precision {precision!r} is not supported there. Use 'minimal' for a quantized denoiser."
        )
    check_mode_fits(spec, device)
    check_precision_available(precision, device)
    if spec.needs_cuda is False and device.type != "cuda" and spec.encoder_placement != "resident":
        logger.info("Memory mode %s on %s: the text encoder stays in CPU memory either way.", mode, device)

    # Quantize on the device the denoiser will run on (bitsandbytes quantizes while moving).
    quant_device = device if spec.transformer_placement == "resident" else torch.device("cpu")
    if precision != "none":
        quantize_transformer(pipe.transformer, precision, device=quant_device)
    if spec.transformer_placement == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        _place_encoder(pipe, spec, device)
        pipe.vae.to(device)
        if spec.transformer_placement == "group_offload":
            pipe.transformer.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
        else:
            pipe.transformer.to(device)
    if spec.vae_tile_px:
        _enable_vae_tiling(pipe.vae, spec.vae_tile_px)
    pipe.memory_mode = mode
    pipe.lens_precision = precision
    return pipe


def compile_transformer_blocks(transformer) -> None:
    """`torch.compile` each denoiser block (compiled on first use, about a minute; each new image size recompiles)."""
    for block in transformer.transformer_blocks:
        block.compile()


def format_memory_mode_table() -> str:
    """The README's table of memory modes, generated from MEMORY_MODES so the two never disagree."""
    lines = ["| mode | for | denoiser | text encoder | VAE tiles | what it does |", "|---|---|---|---|---|---|"]
    for mode in MEMORY_MODES.values():
        denoiser = {"none": "bf16"}.get(mode.transformer_precision, mode.transformer_precision)
        if mode.transformer_placement != "resident":
            denoiser += f", {mode.transformer_placement.replace('_', ' ')}"
        tiles = f"{mode.vae_tile_px} px" if mode.vae_tile_px else "-"
        lines.append(
            f"| `{mode.name}` | {mode.target} | {denoiser} | {mode.encoder_placement.replace('_', ' ')} "
            f"| {tiles} | {mode.description} |"
        )
    return "\n".join(lines) + "\n"


def _enable_vae_tiling(vae, tile_px: int) -> None:
    """Decode in overlapping tiles of `tile_px` pixels: the decoder's activations, not the weights, are what grows
    with the image (several GB at 1440x1440 in one piece). Images larger than a tile differ slightly near the seams."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // 2 ** (len(vae.config.block_out_channels) - 1)


def _place_encoder(pipe, spec: MemoryMode, device: torch.device) -> None:
    if spec.encoder_placement == "resident":
        pipe.text_encoder.to(device)
        keep_dense_experts_if_room(pipe.text_encoder, device)
    elif spec.encoder_placement == "swap":
        enable_encoder_swap(pipe.text_encoder, device)
    elif spec.encoder_placement == "stream":
        enable_encoder_streaming(pipe.text_encoder, device)
    else:
        raise ValueError(f"Encoder placement {spec.encoder_placement!r} needs transformer_placement 'model_offload'.")


def keep_dense_experts_if_room(encoder, device: torch.device) -> int:
    """A resident encoder (full, fast) holds its MXFP4 experts dequantized, layer by layer, as far as the memory left
    after placement allows (keeping a fifth of the memory, at least 6 GB on a GPU / 4 GB of RAM, for activations), so
    encoding does not dequantize on every call. Returns the bytes added."""
    keep = getattr(encoder, "keep_dequantized_experts", None)
    if keep is None:
        return 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        room = free - max(0.2 * total, 6 * 2**30)
    else:
        import psutil

        memory = psutil.virtual_memory()
        room = memory.available - max(0.2 * memory.total, 4 * 2**30)
    return keep(max(0, int(room)))


Result = TypeVar("Result")


def free_device_memory() -> None:
    """Drop unreferenced tensors and hand cached CUDA blocks back, so the next call starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_guard(fn: Callable[[], Result], mode: str | None) -> Result:
    """Call `fn()`; on a CUDA out-of-memory, free what it allocated and raise `LensOutOfMemoryError` naming the next
    smaller memory mode. The pipeline stays usable: nothing it holds is touched."""
    try:
        return fn()
    except torch.OutOfMemoryError as error:
        detail = str(error).splitlines()[0] if str(error) else "CUDA out of memory"
    # Outside the except block: the traceback (and the tensors its frames hold) is released before freeing.
    free_device_memory()
    smaller = next_smaller_mode(mode) if mode in MEMORY_MODES else None
    advice = f"switch to the memory mode {smaller!r}" if smaller else "use a smaller image size or run on CPU"
    raise LensOutOfMemoryError(
        f"The GPU ran out of memory in memory mode {mode!r} ({detail}). Try a smaller size, or {advice}."
    )
