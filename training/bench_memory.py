"""Peak GPU memory of training steps for each card preset: simulated (any machine) and measured (a GPU).

    python -m training.bench_memory --simulate                    # the simulated table, real size, no GPU needed
    python -m training.bench_memory --simulate --write-table      # ... and regenerate training/memory_table.json
    python -m training.bench_memory [--presets 12gb 16gb] [--sizes 512 768 1024] [--steps 5] [--out FILE]   # GPU
    python -m training.bench_memory --tiny          # the tiny denoiser on CPU: checks the code path, no real figures
    python -m training.bench_memory --calibrate     # the simulation against real CPU runs of two real-width blocks

The measured run builds the real-size denoiser with random weights and trains it exactly as the trainer does (its
`_build_model`: frozen base in the preset's precision and the preset's adapter, or the full model in float32; its
`_optimizer`; its `flow_loss` under bf16 autocast), on cached-feature-shaped inputs (415 text tokens, the window's
maximum). Peak memory is `torch.cuda.max_memory_allocated`, printed next to the simulated peak of the same preset
and size from the cached table, with their difference. Results are JSON lines, one per (preset, size).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lens_core.presets import PIXELS_PER_TOKEN

from .config import PRESET_ORDER, PRESETS, TrainConfig
from .memory_estimate import (
    BUCKET_AREAS,
    TEXT_TOKENS,
    TrainingCase,
    build_training_table,
    load_training_table,
    preset_config,
    write_training_table,
)
from .trainer import LensTrainer, shifted_sigmas

logger = logging.getLogger(__name__)


def _build(config: TrainConfig, tiny: bool, device: torch.device):
    """The trainer's own model building on a random-weight denoiser (real size on the GPU, or the tiny one)."""
    from lens_core.tiny import TINY_TRANSFORMER_CONFIG
    from lens_core.transformer_lens import LensTransformer2DModel

    with torch.device("meta" if not tiny else "cpu"):
        model = LensTransformer2DModel(**TINY_TRANSFORMER_CONFIG) if tiny else LensTransformer2DModel()
    keep_fp32 = config.model.base_precision == "fp32" or config.adapter.method == "full"
    if not tiny:  # random real-size weights, created directly on the device in the trainer's load dtype
        model = model.to_empty(device=device).to(torch.float32 if keep_fp32 else torch.bfloat16)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.02)
    trainer = LensTrainer(config)
    trainer.device = device
    trainer.model = trainer._build_model(model)
    return trainer


def _cpu_fallbacks(config: TrainConfig, device: torch.device) -> None:
    """bitsandbytes' NF4 / int8 bases and 8-bit AdamW need CUDA: the CPU code-path check uses fp8 and AdamW."""
    if device.type == "cuda":
        return
    if config.model.base_precision in ("nf4", "int8"):
        config.model.base_precision = "fp8"
    if config.optimizer.name == "adamw8bit":
        config.optimizer.name = "adamw"


def simulated_peak(preset: str, size: int) -> dict | None:
    """The cached simulation of `preset` at the largest bucket of area `size` (None when not tabled)."""
    config = preset_config(preset)
    for row in load_training_table()["real"]:
        if (
            row["preset"] == preset
            and row["area"] == size
            and row["case"]["gradient_checkpointing"] == (config.loop.gradient_checkpointing)
        ):
            return row["peak"]
    return None


def bench_one(preset: str, size: int, steps: int, tiny: bool, device: torch.device) -> dict:
    """Time `steps` optimizer steps of `preset` at size x size; return the figures."""
    config = preset_config(preset)
    config.data.buckets = [[size, size]]
    _cpu_fallbacks(config, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = _build(config, tiny, device)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = trainer._optimizer(trainable)
    grid = size // PIXELS_PER_TOKEN
    channels = trainer.model.config.enc_hidden_dim
    dtype = torch.float32 if config.adapter.method == "full" else torch.bfloat16
    latents = torch.randn(1, grid * grid, trainer.model.config.in_channels)  # [1, L, C]
    text = [torch.randn(1, TEXT_TOKENS, channels, dtype=dtype) for _ in trainer.model.config.selected_layer_index]
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool)
    timings = []
    for _ in range(steps + 1):  # the first step warms up kernels (and creates the optimizer states): not timed
        started = time.perf_counter()
        sigma = shifted_sigmas(torch.randn(1), grid * grid, config.loop.shift_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = trainer.flow_loss(latents, text, mask, (grid, grid), sigma, torch.randn_like(latents))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result = {
        "preset": preset,
        "size": size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny" if tiny else "real-size (random weights)",
        "base_precision": config.model.base_precision,
        "method": config.adapter.method,
        "rank": config.adapter.rank,
        "optimizer": config.optimizer.name,
        "gradient_checkpointing": config.loop.gradient_checkpointing,
        "peak_gib": round(peak_gib, 3),
        "seconds_per_step": round(sum(timings[1:]) / steps, 4),
        "loss": float(loss.detach()),
    }
    if not tiny and device.type == "cuda":
        simulated = simulated_peak(preset, size)
        if simulated is not None:  # the step only: this benchmark does not sample
            result["simulated_step_peak_gib"] = round(simulated["step_peak_gib"], 3)
            result["measured_minus_simulated_gib"] = round(peak_gib - simulated["step_peak_gib"], 3)
    return result


# ----------------------------------------------------------------------------------------------------------------
# The simulated tables (markdown for BENCHMARKS.md and the README)
# ----------------------------------------------------------------------------------------------------------------


def _describe(case: dict) -> str:
    base = {"fp32": "fp32", "bf16": "bf16", "fp8": "fp8", "nf4": "NF4", "int8": "int8"}[case["base_precision"]]
    if case["method"] == "full":
        adapter = "full (fp32 master)"
    else:
        adapter = f"{case['method'].upper() if case['method'] == 'lokr' else 'LoRA'} r{case['rank']}"
    return f"{base} | {adapter} | {case['optimizer']}"


def format_simulated_table(table: dict) -> str:
    """BENCHMARKS.md's training table: each preset x bucket area, checkpointing on and off, next to an empty
    measured column."""
    lines = [
        "| preset | base | adapter | optimizer | bucket (largest) | checkpointing | weights GiB | optimizer states GiB "
        "| step peak GiB | sampling peak GiB | **simulated peak GiB** | card needed GiB | measured peak GiB |",
        "|" + "---|" * 13,
    ]
    for row in table["real"]:
        case, peak = row["case"], row["peak"]
        lines.append(
            f"| {row['preset']} | {_describe(case)} | {case['width']}x{case['height']} "
            f"| {'on' if case['gradient_checkpointing'] else 'off'} | {peak['weights_gib']:.2f} "
            f"| {peak['optimizer_state_gib']:.2f} | {peak['step_peak_gib']:.2f} | {peak['sample_peak_gib']:.2f} "
            f"| **{peak['peak_gib']:.2f}** | {peak['card_gib']:.1f} | |"
        )
    return "\n".join(lines) + "\n"


BUCKET_LABELS = {
    "lens": "all 27 (up to 1024)",
    "lens-512": "512 area",
    "lens-768": "768 area",
    "lens-1024": "1024 area",
}


def format_preset_summary(table: dict) -> str:
    """The README's preset table: each preset with its simulated peak at its own largest bucket."""
    from .memory_estimate import training_peak

    lines = [
        "| preset | base | method | optimizer | buckets | samples | simulated peak | card needed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESET_ORDER:
        config = preset_config(name)
        peak = training_peak(config)
        case = TrainingCase.from_config(config, (0, 0))
        base, adapter, optimizer = (part.strip() for part in _describe(asdict(case)).split("|"))
        buckets = BUCKET_LABELS.get(config.data.buckets, "custom") if isinstance(config.data.buckets, str) else "custom"
        samples = "x".join(str(v) for v in config.monitor.sample_size)
        lines.append(
            f"| {name} | {base} | {adapter} | {optimizer} | {buckets} | {samples} | {peak.peak_gib:.1f} GiB "
            f"| {peak.card_gib:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


# Two real-width blocks, as lens_core.memory_sim's calibration; 512x512; samples small so the CPU run is quick.
CALIBRATION_CASES = (("24gb", {"optimizer.name": "adamw"}), ("48gb", {}))


def calibrate_main() -> int:
    """`--calibrate`: one simulated trainer step next to the same step run for real on the CPU (same tracker)."""
    from lens_core.memory_sim import CALIBRATION_TRANSFORMER_CONFIG

    from .memory_estimate import simulate_training

    lines = [
        "| preset (2 real-width blocks, 512x512) | what | simulated GiB | real CPU run GiB | difference |",
        "|---|---|---|---|---|",
    ]
    for preset, overrides in CALIBRATION_CASES:
        config = preset_config(preset, {**overrides, "monitor.sample_size": [256, 256]})
        args = (config, (512, 512), CALIBRATION_TRANSFORMER_CONFIG)
        simulated, real = simulate_training(*args, fake=True), simulate_training(*args, fake=False)
        label = f"{preset} ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'as is'})"
        for field in ("weights_gib", "optimizer_state_gib", "step_peak_gib", "sample_peak_gib"):
            a, b = getattr(simulated, field), getattr(real, field)
            lines.append(f"| {label} | {field.removesuffix('_gib')} | {a:.4f} | {b:.4f} | {100 * (a - b) / b:+.2f}% |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def simulate_main(args) -> int:
    if args.write_table:
        table = build_training_table()
        write_training_table(table)
        logger.info("Wrote %s", Path(__file__).with_name("memory_table.json"))
    else:
        table = load_training_table()
    sys.stdout.write(format_simulated_table(table) + "\n" + format_preset_summary(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESET_ORDER), choices=list(PRESETS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(BUCKET_AREAS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny denoiser on CPU (a code-path check)")
    parser.add_argument("--simulate", action="store_true", help="print the simulated table (no GPU needed)")
    parser.add_argument("--write-table", action="store_true", help="with --simulate: simulate again and cache it")
    parser.add_argument(
        "--calibrate", action="store_true", help="compare the simulation with real CPU runs (two real-width blocks)"
    )
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.simulate:
        return simulate_main(args)
    if args.calibrate:
        return calibrate_main()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        logger.error("The measured real-size benchmark needs a CUDA GPU; use --simulate (or --tiny) on CPU.")
        return 2
    for preset in args.presets:
        for size in args.sizes:
            if size % 16:
                raise ValueError(f"--sizes must be multiples of 16, got {size}.")
            try:
                result = bench_one(preset, size, args.steps, args.tiny, device)
            except torch.OutOfMemoryError:
                result = {"preset": preset, "size": size, "error": "out of memory"}
                torch.cuda.empty_cache()
            line = json.dumps(result)
            sys.stdout.write(line + "\n")
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
