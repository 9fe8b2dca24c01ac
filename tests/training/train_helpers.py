"""Shared helpers of the training tests: a toy dataset of two visually distinct patterns and tiny-run overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

CAPTIONS = ("a bright white field with a black left border", "a dark checkerboard of red and blue squares")
# Other patterns and captions, for the "pre-trained" base of the learning test.
BASE_CAPTIONS = ("green horizontal stripes on grey", "a plain yellow square with a purple dot")


def pattern(kind: int, size: int = 64) -> np.ndarray:
    """Pattern 0: white with a black left band; pattern 1: a red/blue checkerboard of 16-pixel squares."""
    image = np.zeros((size, size, 3), np.uint8)
    if kind == 2:
        image[:] = 120
        image[(np.arange(size) // 8) % 2 == 0] = (20, 200, 20)
        return image
    if kind == 3:
        image[:] = (230, 220, 30)
        image[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = (120, 20, 160)
        return image
    if kind == 0:
        image[:] = 235
        image[:, : size // 4] = 10
    else:
        ys, xs = np.indices((size, size)) // 16
        board = (ys + xs) % 2 == 0
        image[board] = (200, 20, 20)
        image[~board] = (20, 20, 200)
    return image


def make_toy_dataset(folder: Path, copies: int = 2, size: int = 64, sidecars: bool = True, base: bool = False) -> Path:
    """`copies` images of each pattern with their captions (sidecar .txt files, or metadata.jsonl)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    kinds = ((2, BASE_CAPTIONS[0]), (3, BASE_CAPTIONS[1])) if base else tuple(enumerate(CAPTIONS))
    for kind, caption in kinds:
        for copy in range(copies):
            name = f"pattern{kind}_{copy}.png"
            PIL.Image.fromarray(pattern(kind, size)).save(folder / name)
            if sidecars:
                (folder / name).with_suffix(".txt").write_text(caption)
            else:
                lines.append(json.dumps({"file_name": name, "text": caption}))
    if lines:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def tiny_overrides(checkpoint: Path, data: Path, output: Path, steps: int, **extra) -> dict:
    """Dotted config overrides for a fast CPU run on the tiny checkpoint at 64x64."""
    values = {
        "model.path": str(checkpoint),
        "model.base_precision": "fp32",
        "data.path": str(data),
        "data.buckets": [[64, 64]],
        "data.caption_dropout": 0.0,
        "output_dir": str(output),
        "loop.max_steps": steps,
        "loop.gradient_checkpointing": False,
        "monitor.sample_size": [64, 64],
        "monitor.sample_steps": 4,
        "monitor.sample_every": 0,
        "monitor.tensorboard": False,
    }
    values.update(extra)
    return values


def build_wide_tiny_checkpoint(tiny_checkpoint: Path, folder: Path) -> Path:
    """The tiny checkpoint with a wider denoiser (inner dim 128 = the 128 packed latent channels).

    The stock tiny denoiser is 32 wide, so its frozen `proj_out` can only produce velocities in a 32-dim subspace of
    the 128 latent channels: no adapter can fit the rectified-flow target there. At width 128 a LoRA can learn.
    """
    import shutil

    import torch

    from lens_core.tiny import TINY_TRANSFORMER_CONFIG
    from lens_core.transformer_lens import LensTransformer2DModel

    if (folder / "model_index.json").is_file():
        return folder
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("transformer"))
    config = dict(
        TINY_TRANSFORMER_CONFIG, num_attention_heads=4, attention_head_dim=32, inner_dim=128, axes_dims_rope=[8, 12, 12]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LensTransformer2DModel(**config).save_pretrained(str(folder / "transformer"))
    return folder
