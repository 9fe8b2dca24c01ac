"""Checkpoints that hold the whole training state, written to a temp folder and renamed into place.

`<output>/checkpoints/step-000050/`: `trainable.safetensors` (the trained parameters by name), `ema.safetensors`
(optional), `lora.safetensors` (a usable diffusers-format LoRA), `optimizer.pt`, `scheduler.pt`, `rng.pt` (torch,
CUDA, numpy, python and the trainer's own generator) and `state.json` (step, data position) - written last.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")


class DiskFullError(OSError):
    """The disk filled up while writing a checkpoint (nothing was left half-written)."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders and folders without state.json are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """`latest` -> the newest checkpoint (a ValueError when there is none: resuming must not silently start over);
    a path -> that checkpoint; None -> a fresh run."""
    if resume in (None, ""):
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(
                f"--resume latest: {checkpoint_root(output_dir)} holds no checkpoint yet, so there is nothing to resume; "
                "start the run without --resume (cached features are reused)."
            )
        return checkpoints[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ValueError(
            f"--resume {resume!r} is not a checkpoint folder (no state.json); use 'latest' or a step-NNNNNN folder."
        )
    return path


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (from its state.json, without loading it)."""
    return int(json.loads((Path(path) / "state.json").read_text())["step"])


def rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def save_checkpoint(output_dir: Path, step: int, parts: dict, keep: int) -> Path:
    """Write a checkpoint atomically. `parts`: trainable, ema (or None), optimizer, scheduler, rng, state, write_lora."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    temp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        save_file(parts["trainable"], str(temp / "trainable.safetensors"))
        if parts.get("ema") is not None:
            save_file(parts["ema"], str(temp / "ema.safetensors"))
        torch.save(parts["optimizer"], temp / "optimizer.pt")
        torch.save(parts["scheduler"], temp / "scheduler.pt")
        torch.save(parts["rng"], temp / "rng.pt")
        if parts.get("write_lora") is not None:
            parts["write_lora"](temp / "lora.safetensors")
        (temp / "state.json").write_text(json.dumps(parts["state"], indent=2))
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise DiskFullError(
                errno.ENOSPC,
                f"The disk under {root} is full; checkpoint {step} was not written (the "
                f"previous ones are intact). Free space and resume with --resume latest.",
            ) from error
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Everything `save_checkpoint` wrote, on CPU."""
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        "state": json.loads((path / "state.json").read_text()),
    }
