"""Command line: `python -m lens_core generate --model <hub id | folder | tiny> --prompt ... --out x.png`.

Parse arguments, resolve the model and settings, build the pipeline, run it, save PNGs with their settings.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

from .presets import ASPECT_RATIOS, DEFAULT_PROMPT_DATE, RESOLUTIONS, VARIANTS

logger = logging.getLogger("lens_core")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by every command that loads a pipeline."""
    parser.add_argument(
        "--model",
        default=None,
        help="Hub repo id, local checkpoint folder, or 'tiny' (a random toy "
        "model for offline demos). Default: the --variant's official repo, with mirror fallbacks.",
    )
    parser.add_argument(
        "--variant",
        default=None,
        choices=sorted(VARIANTS),
        help="Which presets apply (default steps and guidance); guessed from the repo id, else Lens-Turbo.",
    )
    parser.add_argument(
        "--transformer-file",
        default=None,
        help="A Comfy-Org single-file denoiser (e.g. lens_bf16.safetensors) to use with --model's other components.",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="Compute dtype (auto: bfloat16 on CUDA, float32 on CPU)."
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--date", default=DEFAULT_PROMPT_DATE, help="Date in the prompt preamble (YYYY-MM-DD).")
    parser.add_argument(
        "--local-files-only", action="store_true", help="Never contact the Hub; use the local cache only."
    )
    from .memory import AUTO, MEMORY_MODES
    from .quantization import PRECISIONS

    modes = "; ".join(f"{mode.name}: {mode.target}" for mode in MEMORY_MODES.values())
    parser.add_argument(
        "--memory-mode",
        default=AUTO,
        choices=[AUTO, *MEMORY_MODES],
        help=f"Placement and precision (auto: the largest that fits the GPU). {modes}",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=sorted(PRECISIONS),
        help="Override the memory mode's denoiser precision (none = as loaded).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lens_core", description="Lens text-to-image from the command line."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate images from a prompt")
    add_model_arguments(generate)
    generate.add_argument("--prompt", required=True, help="What to draw. Dense, detailed descriptions work best.")
    generate.add_argument("--negative-prompt", default="", help="What to avoid (no effect on Lens-Turbo).")
    generate.add_argument("--seed", type=int, default=None, help="Random seed (default: a random one, printed).")
    generate.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the variant's).")
    generate.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the variant's).")
    generate.add_argument("--width", type=int, default=None, help="Width in pixels, a multiple of 16.")
    generate.add_argument("--height", type=int, default=None, help="Height in pixels, a multiple of 16.")
    generate.add_argument("--aspect-ratio", default=None, choices=ASPECT_RATIOS, help="Preset W:H (default 1:1).")
    generate.add_argument(
        "--base-resolution", type=int, default=None, choices=sorted(RESOLUTIONS), help="Preset area (default 1024)."
    )
    generate.add_argument("--num-images", type=int, default=1, help="Images for the prompt (seeds seed, seed+1, ...).")
    generate.add_argument("--out", default="lens.png", help="Output PNG; with several images, _1, _2 ... are appended.")
    return parser


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_from_args(args: argparse.Namespace):
    """Build the pipeline the arguments describe, in its memory mode. Returns (pipe, model label, device)."""
    import torch

    from .memory import apply_memory_mode
    from .pipeline_lens import LensPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variant = args.variant
    model = args.model
    if model is None:
        variant = variant or "Lens-Turbo"
        model = VARIANTS[variant].repo_ids[0]
    pipe = LensPipeline.from_pretrained(
        model,  # a Hub id, a folder, or "tiny"
        torch_dtype=resolve_dtype(args.dtype, device),
        transformer_file=args.transformer_file,
        local_files_only=args.local_files_only,
        variant_name=variant,
        prompt_date=args.date,
    )
    return apply_memory_mode(pipe, args.memory_mode, device, transformer_precision=args.precision), model, device


def run_generate(args: argparse.Namespace) -> list[Path]:
    import torch

    from .metadata import ImageSettings, save_png
    from .presets import resolve_size

    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}.")
    height, width = resolve_size(args.height, args.width, args.base_resolution, args.aspect_ratio)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out!r}.")
    pipe, model_label, _device = load_from_args(args)
    preset = pipe.variant_preset
    steps = preset.num_inference_steps if args.steps is None else args.steps
    guidance = preset.guidance_scale if args.guidance is None else args.guidance
    seed = random.randrange(2**31) if args.seed is None else args.seed
    logger.info(
        "Generating %d image(s) with %s (%s), seed %d, %d steps, guidance %.2f, %dx%d",
        args.num_images,
        model_label,
        preset.name,
        seed,
        steps,
        guidance,
        width,
        height,
    )
    # CPU generators give the same noise on any device, so a seed means the same image everywhere.
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.num_images)]
    result = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=args.num_images,
        generator=generators,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        path = out if args.num_images == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        settings = ImageSettings(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            seed=seed + i,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            variant=preset.name,
            model=str(model_label),
            prompt_date=pipe.prompt_date,
        )
        paths.append(save_png(image, path, settings))
        logger.info("Saved %s", path)
    return paths


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
    except ValueError as error:
        logger.error("error: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
