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
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from .presets import MAX_IMAGE_PIXELS
from .quantization import check_precision_available, get_precision, quantize_transformer

logger = logging.getLogger(__name__)

AUTO = "auto"
ENCODER_PLACEMENTS = ("resident", "swap", "stream", "model_offload")
TRANSFORMER_PLACEMENTS = ("resident", "model_offload", "group_offload")


@dataclass(frozen=True)
class MemoryMode:
    """One named placement / precision recipe. What it needs in GPU memory and system RAM comes from the simulation
    (`lens_core.memory_sim`, cached in `memory_table.json`), not from these fields."""

    name: str
    description: str
    target: str  # the card it is meant for
    transformer_precision: str  # a key of lens_core.quantization.PRECISIONS
    encoder_placement: str  # resident | swap (whole, while encoding) | stream (layer by layer) | model_offload
    transformer_placement: str  # resident | model_offload (diffusers) | group_offload (block by block)
    vae_tile_px: int | None  # the VAE decodes in tiles of this many pixels (None: in one piece)
    needs_cuda: bool  # False: also runs on CPU, where moving between CPU and GPU memory is a no-op
    card_gib: float  # the smallest card it is meant for; the simulated 1024x1024 Lens generation must fit it


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
            card_gib=32,
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
            card_gib=24,
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
            card_gib=24,
        ),
        MemoryMode(
            "low",
            "bf16 denoiser resident; the text encoder streams from pinned CPU memory one layer at a "
            "time (one layer and its dequantized expert: about 0.7 GiB on the GPU); VAE in 512 px tiles. "
            "Same latents as full.",
            "12-16 GB (RTX 3060 12 GB, 4070, 4080)",
            "none",
            "stream",
            "resident",
            512,
            needs_cuda=False,
            card_gib=12,
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
            card_gib=8,
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
            card_gib=16,
        ),
        MemoryMode(
            "sequential",
            "bf16 denoiser offloaded block by block (diffusers group offload with CUDA streams); "
            "text encoder streamed; VAE in 512 px tiles. Slowest, smallest.",
            "6 GB and smaller cards (4 GB too)",
            "none",
            "stream",
            "group_offload",
            512,
            needs_cuda=True,
            card_gib=4,
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
    """System RAM installed, in GiB (what a mode's simulated host-memory need is compared with)."""
    import psutil

    return psutil.virtual_memory().total / 2**30


# What `auto` plans for: the app's default image (Lens, 20 steps with guidance, 1024x1024).
REFERENCE_SIZE = (1024, 1024)
REFERENCE_GUIDANCE = 5.0
# The process around the weights: Python, torch, diffusers, transformers and gradio take 0.4-0.5 GiB of private
# memory (measured: USS after importing them, torch 2.13 CPU), and the CUDA runtime with its libraries about 1 GiB
# more on the host (estimate; the measured column of BENCHMARKS.md will say).
HOST_PROCESS_GIB = 1.5


def mode_vram_need_gib(
    name: str,
    width: int = REFERENCE_SIZE[0],
    height: int = REFERENCE_SIZE[1],
    guidance_scale: float = REFERENCE_GUIDANCE,
    precision: str | None = None,
) -> float:
    """GPU memory (GiB, as `usable_vram_gb` counts it) mode `name` needs for one image: the simulated peak plus the
    allocator and workspace margin (`lens_core.memory_sim.required_free_gib`). `precision` overrides the mode's
    denoiser precision."""
    from .memory_sim import generation_peak_gib, required_free_gib

    mode = get_memory_mode(name)
    if precision == mode.transformer_precision:
        precision = None
    return required_free_gib(generation_peak_gib(mode.name, width, height, guidance_scale, precision))


def mode_ram_need_gib(name: str) -> float:
    """System RAM (GiB) mode `name` needs: the simulated host peak of loading and placing it, plus the process."""
    from .memory_sim import host_peak_gib

    return host_peak_gib(get_memory_mode(name).name) + HOST_PROCESS_GIB


def pick_memory_mode(
    vram_gb: float,
    ram_gb: float,
    width: int = REFERENCE_SIZE[0],
    height: int = REFERENCE_SIZE[1],
    guidance_scale: float = REFERENCE_GUIDANCE,
) -> str:
    """The largest mode in SIZE_ORDER whose simulated GPU need (for a `width` x `height` image at this guidance)
    fits `vram_gb` of usable GPU memory and whose simulated RAM need fits `ram_gb`."""
    needs = {
        name: (mode_vram_need_gib(name, width, height, guidance_scale), mode_ram_need_gib(name)) for name in SIZE_ORDER
    }
    for name, (vram_need, ram_need) in needs.items():
        if vram_need <= vram_gb and ram_need <= ram_gb:
            return name
    raise ValueError(
        f"No memory mode fits {vram_gb:.1f} GiB of usable GPU memory and {ram_gb:.1f} GiB of system RAM for a "
        f"{width}x{height} image: "
        + "; ".join(f"{name} needs {vram:.1f} GiB GPU + {ram:.1f} GiB RAM" for name, (vram, ram) in needs.items())
        + " (simulated). Run on CPU with --device cpu."
    )


def choose_memory_mode(device: torch.device | str | None = None) -> str:
    """`auto`: the largest mode that fits the usable VRAM and the system RAM (CPU machines get `full`)."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "full"
    vram = usable_vram_gb(device if device is not None and device.index is not None else None)
    return pick_memory_mode(vram, total_ram_gb())


def fitting_modes(vram_gb: float, width: int, height: int, guidance_scale: float) -> list[str]:
    """The modes of SIZE_ORDER whose simulated need for this image fits `vram_gb`, largest first."""
    return [name for name in SIZE_ORDER if mode_vram_need_gib(name, width, height, guidance_scale) <= vram_gb]


def check_mode_fits(mode: MemoryMode, device: torch.device, precision: str | None = None) -> None:
    """Raise a ValueError when `mode` (with its denoiser in `precision`, default its own) cannot work on `device`
    (by the simulated need of a 1024x1024 Lens image), naming the mode that would."""
    if device.type != "cuda":
        if mode.needs_cuda:
            raise ValueError(
                f"Memory mode {mode.name!r} needs a CUDA GPU and the device is {device}; "
                f"use 'full', 'balanced', 'low' or 'minimal' here."
            )
        return
    vram = usable_vram_gb(device if device.index is not None else None)
    need = mode_vram_need_gib(mode.name, precision=precision)
    if vram < need:
        fitting = fitting_modes(vram, *REFERENCE_SIZE, REFERENCE_GUIDANCE)
        advice = f"{fitting[0]!r} fits this GPU" if fitting else "no mode fits it; run on CPU with --device cpu"
        raise ValueError(
            f"Memory mode {mode.name!r} needs about {need:.1f} GiB of GPU memory for a 1024x1024 image (simulated) "
            f"but only {vram:.1f} GiB is usable; {advice}."
        )
    check_precision_available(precision or mode.transformer_precision, device)
    ram, ram_need = total_ram_gb(), mode_ram_need_gib(mode.name)
    if ram < ram_need:
        logger.warning(
            "Memory mode %s needs about %.1f GiB of system RAM (simulated); this machine has %.1f GiB.",
            mode.name,
            ram_need,
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
            _point(tensor, home.to(self.device, non_blocking=True))
        self.is_onloaded = True

    def offload(self) -> None:
        """Point every tensor back at its CPU copy; the device copies are freed."""
        for tensor, home in self.tensors:
            _point(tensor, home)
        self.is_onloaded = False

    def num_bytes(self) -> int:
        return sum(home.numel() * home.element_size() for _tensor, home in self.tensors)


def _point(tensor: torch.Tensor, target: torch.Tensor) -> None:
    """Make the parameter or buffer `tensor` use `target`'s memory, keeping the object the module holds."""
    if torch._has_compatible_shallow_copy_type(tensor, target):
        tensor.data = target  # CPU <-> CUDA: the usual case
        return
    # Two backends whose tensors cannot trade storage (the fake CPU and fake meta tensors of lens_core.memory_sim):
    # swap the objects' contents with a fresh alias of `target`, so the caller's `target` object stays as it is.
    replacement = target.detach()
    if isinstance(tensor, nn.Parameter):
        replacement = nn.Parameter(replacement, requires_grad=tensor.requires_grad)
    torch.utils.swap_tensors(tensor, replacement)


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple (e.g. the denoiser's RopeTables)
        return type(value)(*(_to_device(item, device) for item in value))
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
    check_mode_fits(spec, device, precision)
    check_precision_available(precision, device)
    if spec.needs_cuda is False and device.type != "cuda" and spec.encoder_placement != "resident":
        logger.info("Memory mode %s on %s: the text encoder stays in CPU memory either way.", mode, device)
    place_components(pipe, spec, precision, device)
    pipe.memory_mode = mode
    pipe.lens_precision = precision
    return pipe


@dataclass(frozen=True)
class PlacementBackend:
    """The library calls a placement makes; `lens_core.memory_sim` swaps in stand-ins that run on fake tensors."""

    quantize: Callable = quantize_transformer  # (transformer, precision, device=...)
    model_offload: Callable | None = None  # (pipe, device); None: diffusers' `enable_model_cpu_offload`
    block_offload: Callable | None = None  # (transformer, device); None: diffusers' block-level group offload
    # A resident encoder fills the room left after placement with dequantized experts (a speed cache, not a need:
    # the simulation counts what a mode requires, so it leaves this off).
    dense_experts: bool = True


def place_components(
    pipe, spec: MemoryMode, precision: str, device: torch.device, backend: PlacementBackend | None = None
) -> None:
    """Quantize and place `pipe`'s components as `spec` says (no checks: `apply_memory_mode` makes them)."""
    backend = backend or PlacementBackend()
    # Quantize on the device the denoiser will run on (bitsandbytes quantizes while moving).
    quant_device = device if spec.transformer_placement == "resident" else torch.device("cpu")
    if precision != "none":
        backend.quantize(pipe.transformer, precision, device=quant_device)
    if spec.transformer_placement == "model_offload":
        (backend.model_offload or _diffusers_model_offload)(pipe, device)
    else:
        _place_encoder(pipe, spec, device)
        pipe.vae.to(device)
        if spec.transformer_placement == "group_offload":
            (backend.block_offload or _diffusers_block_offload)(pipe.transformer, device)
        else:
            pipe.transformer.to(device)
        if spec.encoder_placement == "resident" and backend.dense_experts:
            # Last, so the room is what every component left: the denoiser and the VAE are already placed.
            keep_dense_experts_if_room(pipe.text_encoder, device, spec.name)
    if spec.vae_tile_px:
        _enable_vae_tiling(pipe.vae, spec.vae_tile_px)


def _diffusers_model_offload(pipe, device: torch.device) -> None:
    pipe.enable_model_cpu_offload(device=device)


def _diffusers_block_offload(transformer, device: torch.device) -> None:
    transformer.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
    )


def compile_transformer_blocks(transformer) -> None:
    """`torch.compile` each denoiser block (compiled on first use, about a minute; each new image size recompiles)."""
    for block in transformer.transformer_blocks:
        block.compile()


def format_memory_mode_table() -> str:
    """The README's table of memory modes, generated from MEMORY_MODES and the simulated table so they never
    disagree: each card size next to the simulated peak of a Lens image (20 steps with guidance) at 1024x1024 and
    1440x1440, the card that needs (peak plus the CUDA margin) and the system RAM."""
    from .memory_sim import generation_peak_gib, required_card_gib

    lines = [
        "| mode | for | simulated peak 1024² / 1440² | card needed 1024² / 1440² | RAM | denoiser | text encoder "
        "| VAE tiles | what it does |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MEMORY_MODES.values():
        denoiser = {"none": "bf16"}.get(mode.transformer_precision, mode.transformer_precision)
        if mode.transformer_placement != "resident":
            denoiser += f", {mode.transformer_placement.replace('_', ' ')}"
        tiles = f"{mode.vae_tile_px} px" if mode.vae_tile_px else "-"
        peaks = [generation_peak_gib(mode.name, size, size, REFERENCE_GUIDANCE) for size in (1024, 1440)]
        lines.append(
            f"| `{mode.name}` | {mode.target} | {peaks[0]:.1f} / {peaks[1]:.1f} GiB "
            f"| {required_card_gib(peaks[0]):.1f} / {required_card_gib(peaks[1]):.1f} GiB "
            f"| {mode_ram_need_gib(mode.name):.1f} GiB | {denoiser} | {mode.encoder_placement.replace('_', ' ')} "
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
    elif spec.encoder_placement == "swap":
        enable_encoder_swap(pipe.text_encoder, device)
    elif spec.encoder_placement == "stream":
        enable_encoder_streaming(pipe.text_encoder, device)
    else:
        raise ValueError(f"Encoder placement {spec.encoder_placement!r} needs transformer_placement 'model_offload'.")


def keep_dense_experts_if_room(encoder, device: torch.device, mode: str) -> int:
    """A resident encoder (full, fast) holds its MXFP4 experts dequantized, layer by layer, as far as the memory left
    after placement allows, so encoding does not dequantize on every call. On a GPU it keeps free what `mode`'s
    largest image needs above its resident weights (the simulated table, with the CUDA margin); on the CPU a fifth
    of the RAM (at least 4 GB). Returns the bytes added."""
    keep = getattr(encoder, "keep_dequantized_experts", None)
    if keep is None:
        return 0
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        room = free - generation_headroom_gib(mode) * 2**30
    else:
        import psutil

        memory = psutil.virtual_memory()
        room = memory.available - max(0.2 * memory.total, 4 * 2**30)
    return keep(max(0, int(room)))


def generation_headroom_gib(mode: str) -> float:
    """Free GPU memory (GiB) a generation in `mode` needs above the weights placed for it: the simulated peak of the
    largest image the engine accepts, with guidance, minus the mode's resident bytes, plus the allocator margin."""
    from .memory_sim import generation_peak_gib, load_memory_table, required_free_gib

    side = math.isqrt(MAX_IMAGE_PIXELS)
    resident = load_memory_table()["real"]["modes"][mode]["resident_gib"]
    return required_free_gib(generation_peak_gib(mode, side, side, REFERENCE_GUIDANCE)) - resident


Result = TypeVar("Result")


def free_device_memory() -> None:
    """Drop unreferenced tensors and hand cached CUDA blocks back, so the next call starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_guard(
    fn: Callable[[], Result],
    mode: str | None,
    width: int | None = None,
    height: int | None = None,
    guidance_scale: float | None = None,
) -> Result:
    """Call `fn()`; on a CUDA out-of-memory, free what it allocated and raise `LensOutOfMemoryError` with advice from
    the simulated table: the largest mode whose need for this image (`width` x `height` at `guidance_scale`) fits
    this GPU, or the next smaller mode when the image is not given. The pipeline stays usable: nothing it holds is
    touched."""
    try:
        return fn()
    except torch.OutOfMemoryError as error:
        detail = str(error).splitlines()[0] if str(error) else "CUDA out of memory"
    # Outside the except block: the traceback (and the tensors its frames hold) is released before freeing.
    free_device_memory()
    usable = usable_vram_gb() if torch.cuda.is_available() else None
    advice = oom_advice(mode, width, height, guidance_scale, usable)
    raise LensOutOfMemoryError(f"The GPU ran out of memory in memory mode {mode!r} ({detail}). {advice}")


def oom_advice(
    mode: str | None,
    width: int | None,
    height: int | None,
    guidance_scale: float | None,
    usable_gib: float | None,
) -> str:
    """What to do after an out-of-memory: with the image size and the usable GPU memory known, the largest smaller
    mode whose simulated need fits; otherwise the next smaller mode."""
    known = mode in MEMORY_MODES
    if known and width and height and usable_gib is not None:
        guidance = REFERENCE_GUIDANCE if guidance_scale is None else guidance_scale
        order = list(SIZE_ORDER)
        start = order.index({"fast": "full", "offload": "minimal"}.get(mode, mode))
        smaller = [name for name in fitting_modes(usable_gib, width, height, guidance) if order.index(name) > start]
        if smaller:
            need = mode_vram_need_gib(smaller[0], width, height, guidance)
            return (
                f"For {width}x{height} switch to the memory mode {smaller[0]!r} (it needs about {need:.1f} GiB, "
                f"simulated; {usable_gib:.1f} GiB is usable), or use a smaller size."
            )
        return (
            f"No smaller memory mode fits {width}x{height} in {usable_gib:.1f} GiB (simulated); use a smaller size "
            f"or run on CPU."
        )
    smaller = next_smaller_mode(mode) if known else None
    advice = f"switch to the memory mode {smaller!r}" if smaller else "use a smaller image size or run on CPU"
    return f"Try a smaller size, or {advice}."
