"""Memory and speed benchmark of LoRA training steps on the real-size Lens denoiser with random weights.

    python -m training.bench_memory [--presets 12gb 16gb 24gb] [--sizes 512 768 1024] [--steps 5] [--out FILE]
    python -m training.bench_memory --tiny          # the tiny denoiser on CPU: checks the code path, no real figures

For each preset and square size it builds the denoiser (random weights, as the preset stores the frozen base), adds
the preset's adapter, and times optimizer steps on cached-feature-shaped inputs (text encoder not resident: features
are cached in real runs). Peak memory is `torch.cuda.max_memory_allocated`; on CPU the process's peak RSS.
Results are JSON lines, one per (preset, size), for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from .base_precision import freeze_base
from .config import PRESETS, TrainConfig, _apply, _nest
from .trainer import shifted_sigmas, target_module_names

logger = logging.getLogger(__name__)
TEXT_TOKENS = 256  # a dense ~150-word caption plus the suffix


def _build(config: TrainConfig, tiny: bool, device: torch.device):
    from lens_core.tiny import TINY_TRANSFORMER_CONFIG
    from lens_core.transformer_lens import LensTransformer2DModel

    with torch.device("meta" if not tiny else "cpu"):
        model = LensTransformer2DModel(**TINY_TRANSFORMER_CONFIG) if tiny else LensTransformer2DModel()
    if not tiny:  # random real-size weights, created directly in bf16 on the device
        model = model.to_empty(device=device).to(torch.bfloat16)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.02)
    freeze_base(model, config.model.base_precision, device)
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(
            r=config.adapter.rank, lora_alpha=config.adapter.alpha, target_modules=target_module_names(model, config)
        )
    )
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if config.loop.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _optimizer(config: TrainConfig, parameters, device: torch.device):
    if config.optimizer.name == "adamw8bit" and device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=1e-4)
    return torch.optim.AdamW(parameters, lr=1e-4)  # adamw8bit needs CUDA: the CPU run uses AdamW


def bench_one(preset: str, size: int, steps: int, tiny: bool, device: torch.device) -> dict:
    """Time `steps` optimizer steps of `preset` at size x size; return the figures."""
    config = TrainConfig()
    _apply(config, _nest(PRESETS[preset]))
    if device.type != "cuda" and config.model.base_precision in ("nf4", "int8"):
        config.model.base_precision = "fp8"  # bitsandbytes needs CUDA; recorded in the result
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = _build(config, tiny, device)
    optimizer = _optimizer(config, [p for p in model.parameters() if p.requires_grad], device)
    grid = size // 16
    channels = model.config.enc_hidden_dim
    latents = torch.randn(1, grid * grid, 128, device=device)  # [1, L, 128]
    text = [
        torch.randn(1, TEXT_TOKENS, channels, device=device, dtype=torch.bfloat16)
        for _ in model.config.selected_layer_index
    ]
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    timings = []
    for _ in range(steps + 1):  # the first step warms up kernels and is not timed
        started = time.perf_counter()
        noise = torch.randn_like(latents)
        sigma = shifted_sigmas(torch.randn(1), grid * grid, config.loop.shift_steps).to(device)
        noisy = (1 - sigma[:, None, None]) * latents + sigma[:, None, None] * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(noisy, text, mask, sigma, [(1, grid, grid)], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {
        "preset": preset,
        "size": size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny" if tiny else "real-size (random weights)",
        "base_precision": config.model.base_precision,
        "rank": config.adapter.rank,
        "gradient_checkpointing": config.loop.gradient_checkpointing,
        "peak_gib": round(peak_gib, 3),
        "seconds_per_step": round(sum(timings[1:]) / steps, 4),
        "loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["12gb", "16gb", "24gb"], choices=list(PRESETS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny denoiser on CPU (a code-path check)")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        logger.error("The real-size benchmark needs a CUDA GPU; use --tiny on CPU.")
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
