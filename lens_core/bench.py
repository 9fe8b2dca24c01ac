"""Speed and memory of every memory mode: `python -m lens_core.bench`.

Builds the components with random weights (speed and memory do not depend on the values): the real-size model on a
GPU (`--size real`), the tiny one elsewhere (`--size tiny`, seconds on a CPU, so CI runs the same code). For each mode,
variant and resolution it prints time per image, time per denoiser step, text-encoding time, peak GPU memory (at real
size next to the simulated peak of `lens_core.memory_sim`), peak RAM the mode holds in CPU memory while generating,
and the cosine similarity of the latents to the `full` mode's on the same seed. `--vram-cap-gb 8` caps the usable GPU
memory (`torch.cuda.set_per_process_memory_fraction`) to show a mode really fits an 8 GB card.

Without a GPU: `--simulate` prints the simulated peak memory of every mode at real size (`--write-table` simulates it
again and caches it in the package), `--calibrate` compares the simulator with real CPU runs.

    python -m lens_core.bench --size real --vram-cap-gb 12 --out bench-12gb.md
    python -m lens_core.bench --simulate
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic_io import atomic_write_text
from .memory import (
    MEMORY_MODES,
    LensOutOfMemoryError,
    apply_memory_mode,
    compile_transformer_blocks,
    free_device_memory,
    run_with_oom_guard,
)
from .memory_sim import REAL_ENCODER_CONFIG, build_modules_on_meta, cast_as_loaded
from .presets import VARIANTS, guidance_is_identity

logger = logging.getLogger(__name__)

BENCH_PROMPT = "A red fox sitting in tall green grass at sunset, warm light, detailed fur texture."
BENCH_VARIANTS = ("Lens", "Lens-Turbo")  # their steps and guidance come from lens_core.presets.VARIANTS
REAL_SIZES = (1024, 1440)
TINY_SIZES = (64,)


@dataclass
class BenchRow:
    """One (mode, variant, size) measurement; `status` is "ok", "OOM: ..." or "skipped: <reason>"."""

    mode: str
    variant: str
    size: int
    steps: int
    status: str = "ok"
    encode_s: float | None = None
    image_s: float | None = None
    step_s: float | None = None
    peak_gpu_gb: float | None = None
    simulated_gpu_gb: float | None = None  # lens_core.memory_sim's peak for this row (real size only)
    peak_ram_gb: float | None = None
    cosine_to_full: float | None = None
    cfg_slowdown: float | None = None  # guidance-1 variants: loop time with the unconditional pass / without it
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Components with random weights
# ----------------------------------------------------------------------------------------------------------------


def _fill_random_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights ~ N(0, 0.02), norm weights 1, MXFP4 bytes uniform with scales near 2^-4 (like a trained layer)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.dtype == torch.uint8:
            high = 125 if name.endswith("_scales") else 256
            low = 121 if name.endswith("_scales") else 0
            tensor.data.copy_(torch.randint(low, high, tensor.shape, generator=generator, dtype=torch.uint8))
        elif tensor.is_floating_point():
            if "norm" in name and tensor.ndim == 1:
                tensor.data.fill_(1.0)
            else:
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)


def build_random_components(
    encoder_config: dict,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict:
    """Lens components with random weights on CPU, built as the loader builds them (MXFP4 expert bytes, float32
    encoder norms); the tokenizer comes from the tiny builder. The defaults of the two configs are the real model
    (about 22 GB of RAM in bf16)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    from .tiny import SCHEDULER_CONFIG, build_tiny_tokenizer

    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="lens-bench-tokenizer-")))
    encoder_config = {**encoder_config, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.pad_token_id}
    encoder, transformer, _ = build_modules_on_meta(encoder_config, transformer_config, vae_config)
    encoder = encoder.to_empty(device="cpu")
    encoder.rotary_emb = type(encoder.rotary_emb)(encoder.config)  # computed tables, not weights
    transformer = transformer.to_empty(device="cpu")
    for module in (encoder.model, transformer):
        _fill_random_(module, generator)
    vae = AutoencoderKLFlux2(**(vae_config or {}))  # its own initialisation (FLUX.2 defaults: the real VAE)
    cast_as_loaded(encoder, transformer, vae, dtype)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        "tokenizer": tokenizer,
        "text_encoder": encoder.eval().requires_grad_(False),
        "transformer": transformer.eval().requires_grad_(False),
        "vae": vae.eval().requires_grad_(False),
    }


def build_real_size_components(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """The real-size Lens (4.1 B denoiser, 24-layer MXFP4 GPT-OSS, FLUX.2 VAE) with random weights on CPU."""
    return build_random_components(REAL_ENCODER_CONFIG, dtype=dtype, seed=seed)


def build_tiny_components(dtype: torch.dtype = torch.float32, checkpoint: str | Path | None = None) -> dict:
    """The components of `checkpoint` (a Lens folder: the real weights if you have them), else of the cached tiny
    checkpoint, loaded as `LensPipeline.from_pretrained` loads them."""
    from .loading import load_components, resolve_checkpoint
    from .tiny import ensure_tiny_checkpoint

    folder = resolve_checkpoint(checkpoint, local_files_only=True)[0] if checkpoint else ensure_tiny_checkpoint()
    return load_components(folder, torch_dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RamPeak:
    """Samples this process's resident memory every 20 ms in a thread; `peak_gb` is the highest since `reset()`."""

    def __init__(self, interval_s: float = 0.02):
        import psutil

        self._process, self._interval = psutil.Process(), interval_s
        self._peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> RamPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def current_gb(self) -> float:
        return self._process.memory_info().rss / 2**30

    def reset(self) -> None:
        self._peak = self._process.memory_info().rss

    @property
    def peak_gb(self) -> float:
        return max(self._peak, self._process.memory_info().rss) / 2**30


def _generate(pipe, size: int, steps: int, guidance: float, output_type: str, **kwargs):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        prompt=BENCH_PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type=output_type,
        **kwargs,
    ).images


def measure(
    pipe,
    mode: str,
    variant: str,
    size: int,
    device: torch.device,
    repeats: int,
    ram: RamPeak | None = None,
    ram_baseline_gb: float = 0.0,
) -> BenchRow:
    """Encode once (timed), warm up, then time denoising alone (latents) and whole images (decode included)."""
    from .text_cache import TextFeatureCache

    steps, guidance = VARIANTS[variant].num_inference_steps, VARIANTS[variant].guidance_scale
    row = BenchRow(mode, variant, size, steps)
    pipe.text_feature_cache = TextFeatureCache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run_with_oom_guard(lambda: pipe.encode_prompt(BENCH_PROMPT, device=device, do_classifier_free_guidance=False), mode)
    _sync(device)
    row.encode_s = time.perf_counter() - start
    latents = run_with_oom_guard(lambda: _generate(pipe, size, steps, guidance, "latent"), mode)  # warm-up
    _sync(device)
    denoise, image = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = run_with_oom_guard(lambda: _generate(pipe, size, steps, guidance, "latent"), mode)
        _sync(device)
        denoise.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_with_oom_guard(lambda: _generate(pipe, size, steps, guidance, "pt"), mode)
        _sync(device)
        image.append(time.perf_counter() - start)
    row.step_s = min(denoise) / steps
    if guidance_is_identity(
        guidance
    ):  # the pipeline skips the unconditional half: show what that saves (target >= 1.8x)
        with_cfg = []
        for _ in range(2):  # the first run warms up the doubled batch (allocator, kernels, recompiles)
            start = time.perf_counter()
            run_with_oom_guard(lambda: _generate(pipe, size, steps, 2.0, "latent"), mode)
            _sync(device)
            with_cfg.append(time.perf_counter() - start)
        row.cfg_slowdown = with_cfg[-1] / min(denoise)
    row.image_s = min(image)
    if device.type == "cuda":
        row.peak_gpu_gb = torch.cuda.max_memory_allocated(device) / 2**30
        row.extra["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    if ram is not None:  # what the mode holds in CPU memory while generating, beyond the benchmark's master copy
        row.peak_ram_gb = ram.peak_gb - ram_baseline_gb
    row.extra["latents"] = latents.float().cpu()
    return row


def run_benchmark(
    components: dict,
    modes: list[str],
    variants: list[str],
    sizes: list[int],
    device: torch.device,
    repeats: int = 1,
    compile_blocks: bool = False,
    real_size: bool = False,
) -> list[BenchRow]:
    """Every (mode, variant, size): a fresh copy of the components per mode, since modes quantize and hook in place.
    `real_size`: the components are the real Lens, so each row also gets the simulated peak to compare with."""
    with RamPeak() as ram:
        rows = _run_modes(components, modes, variants, sizes, device, repeats, compile_blocks, ram)
    if real_size:
        for row in rows:
            row.simulated_gpu_gb = simulated_row_peak(row)
    return rows


def simulated_row_peak(row: BenchRow) -> float:
    """The simulated peak of what `measure` ran: every row's run includes a guided batch (Lens's own guidance, and
    guidance-1 variants are run once more with the unconditional batch for the CFG-pass cost)."""
    from .memory_sim import generation_peak_gib

    return generation_peak_gib(row.mode, row.size, row.size, guidance_scale=5.0)


def _run_modes(components, modes, variants, sizes, device, repeats, compile_blocks, ram: RamPeak) -> list[BenchRow]:
    from .pipeline_lens import LensPipeline

    rows, reference = [], {}
    for mode in modes:
        ram_baseline_gb = ram.current_gb()  # the master components (and Python, torch) are not the mode's
        try:
            pipe = apply_memory_mode(LensPipeline(**copy.deepcopy(components)), mode, device)
        except ValueError as error:  # the mode cannot run here: say why, keep going
            rows += [
                BenchRow(mode, v, s, VARIANTS[v].num_inference_steps, status=f"skipped: {error}")
                for v in variants
                for s in sizes
            ]
            continue
        pipe.set_progress_bar_config(disable=True)
        if compile_blocks:
            compile_transformer_blocks(pipe.transformer)
        for variant in variants:
            for size in sizes:
                try:
                    ram.reset()
                    row = measure(pipe, mode, variant, size, device, repeats, ram, ram_baseline_gb)
                except LensOutOfMemoryError as error:
                    row = BenchRow(mode, variant, size, VARIANTS[variant].num_inference_steps, status=f"OOM: {error}")
                latents = row.extra.pop("latents", None)
                if latents is not None:
                    key = (variant, size)
                    if mode == "full":
                        reference[key] = latents
                    if key in reference:
                        row.cosine_to_full = torch.nn.functional.cosine_similarity(
                            latents.flatten(), reference[key].flatten(), dim=0
                        ).item()
                rows.append(row)
                logger.info("%s", format_row(row))
        del pipe
        free_device_memory()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------

HEADER = (
    "mode",
    "variant",
    "size",
    "steps",
    "encode s",
    "s / image",
    "s / step",
    "peak GPU GB",
    "simulated GPU GB",
    "mode RAM GB",
    "cos vs full",
    "CFG-pass cost x",
    "status",
)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_row(row: BenchRow) -> str:
    cells = (
        row.mode,
        row.variant,
        f"{row.size}x{row.size}",
        str(row.steps),
        _number(row.encode_s),
        _number(row.image_s),
        _number(row.step_s, 4),
        _number(row.peak_gpu_gb, 2),
        _number(row.simulated_gpu_gb, 2),
        _number(row.peak_ram_gb, 2),
        _number(row.cosine_to_full, 4),
        _number(row.cfg_slowdown, 2),
        row.status,
    )
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[BenchRow], device_label: str) -> str:
    """A markdown table with the device it was measured on."""
    lines = [f"Device: {device_label}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + [format_row(row) for row in rows]) + "\n"


def device_label(device: torch.device, vram_cap_gb: float | None) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = f", capped at {vram_cap_gb} GB" if vram_cap_gb else ""
        return f"{name} (torch {torch.__version__}{cap})"
    return f"CPU, {os.cpu_count()} cores (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lens_core.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        choices=("auto", "real", "tiny"),
        default="auto",
        help="Model size: real (random weights, needs a GPU and ~24 GB RAM) or tiny; auto: real on CUDA.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="Benchmark this Lens folder (e.g. the real weights) instead of random weights.",
    )
    parser.add_argument(
        "--modes", default="all", help=f"Comma-separated modes (default all: {','.join(MEMORY_MODES)})."
    )
    parser.add_argument(
        "--variants", default="Lens-Turbo,Lens", help="Comma-separated: Lens (20 steps), Lens-Turbo (4)."
    )
    parser.add_argument(
        "--resolutions", default=None, help="Comma-separated square sizes (default 1024,1440 real; 64 tiny)."
    )
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu).")
    parser.add_argument("--vram-cap-gb", type=float, default=None, help="Cap usable GPU memory to this many GB.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per row; the fastest is reported.")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block first.")
    parser.add_argument("--out", default=None, help="Also write the table (markdown) here, and a .json beside it.")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="Print the simulated peak memory of every mode at real size (no GPU, no weights: lens_core.memory_sim).",
    )
    parser.add_argument(
        "--write-table",
        action="store_true",
        help="With --simulate: simulate everything again (about 20 minutes on a CPU) and cache it in the package.",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="Compare the simulator with real CPU runs of two real-width denoiser blocks at 512x512 (a minute).",
    )
    return parser


def _split(text: str, allowed, what: str) -> list:
    values = [item.strip() for item in text.split(",") if item.strip()]
    bad = [value for value in values if value not in allowed]
    if not values or bad:
        raise ValueError(f"--{what} got {bad or text!r}; allowed: {list(allowed)}.")
    return values


def simulate_main(write_table: bool, out: str | None) -> int:
    """`--simulate`: the simulated tables (markdown), from the cached table or simulated again."""
    from . import memory_sim

    if write_table:
        table = memory_sim.build_memory_table()
        memory_sim.write_memory_table(table)
        memory_sim.load_memory_table.cache_clear()
        logger.info("Wrote %s", memory_sim.table_path())
    else:
        table = memory_sim.load_memory_table()
    text = (
        f"Simulated at real size (torch {table['torch']}; {table['text_tokens']} text tokens; "
        f"regenerate: {table['regenerate']})\n\n"
        + memory_sim.format_generation_table(table)
        + "\n"
        + memory_sim.format_host_table(table)
        + "\n"
        + memory_sim.format_vae_table(table)
    )
    print(text)  # noqa: T201 (the command's output)
    if out:
        atomic_write_text(Path(out), text)
    return 0


def calibrate_main(out: str | None) -> int:
    """`--calibrate`: the simulator against real CPU runs (the same live-bytes tracker on real tensors)."""
    from .memory_sim import format_calibration, run_calibrations

    text = format_calibration(run_calibrations())
    print(text)  # noqa: T201 (the command's output)
    if out:
        atomic_write_text(Path(out), text)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.simulate:
        return simulate_main(args.write_table, args.out)
    if args.calibrate:
        return calibrate_main(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size if args.size != "auto" else ("real" if device.type == "cuda" else "tiny")
    modes = list(MEMORY_MODES) if args.modes == "all" else _split(args.modes, MEMORY_MODES, "modes")
    variants = _split(args.variants, BENCH_VARIANTS, "variants")
    default_sizes = REAL_SIZES if size == "real" else TINY_SIZES
    resolutions = default_sizes if args.resolutions is None else [int(v) for v in args.resolutions.split(",")]
    if any(value % 16 or value < 16 for value in resolutions) or args.repeats < 1:
        raise ValueError(
            f"--resolutions must be multiples of 16 (got {resolutions}); --repeats >= 1 (got {args.repeats})."
        )
    if args.vram_cap_gb is not None:
        if device.type != "cuda":
            raise ValueError(f"--vram-cap-gb needs a CUDA device, got {device}.")
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gb / total), device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.checkpoint:
        components, size = build_tiny_components(dtype, args.checkpoint), f"checkpoint {args.checkpoint}"
    elif size == "real":
        components = build_real_size_components(dtype)
    else:
        components = build_tiny_components(dtype)
    real_size = size == "real" and not args.checkpoint
    rows = run_benchmark(
        components, modes, variants, list(resolutions), device, args.repeats, args.compile, real_size=real_size
    )
    table = format_table(rows, f"{device_label(device, args.vram_cap_gb)}, {size} model")
    print(table)  # noqa: T201 (the command's output)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, table)
        atomic_write_text(out.with_suffix(".json"), json.dumps([asdict(row) for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["micro"]:  # `python -m lens_core.bench micro ...`: the CPU micro-benchmark (bench_cpu.py)
        from .bench_cpu import main as micro_main

        raise SystemExit(micro_main(sys.argv[2:]))
    raise SystemExit(main())
