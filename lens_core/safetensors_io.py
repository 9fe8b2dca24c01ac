"""Reading safetensors checkpoints (single files, sharded folders with an index) with clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")


def checkpoint_files(folder_or_file: str | Path) -> list[Path]:
    """The safetensors files of a component: a single file, the shards named by an index, or every file in a folder."""
    path = Path(folder_or_file)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"No checkpoint at {path}: it is neither a file nor a folder.")
    for name in INDEX_NAMES:
        index = path / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"The shard index {index} is not valid JSON with a 'weight_map': {error}") from error
            shards = sorted({path / shard for shard in weight_map.values()})
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise ValueError(f"{index} names shards that are missing: {missing}.")
            return shards
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No .safetensors weights in {path}.")
    return files


def iter_checkpoint_tensors(folder_or_file: str | Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of a checkpoint, one at a time (no full copy in memory)."""
    for file in checkpoint_files(folder_or_file):
        try:
            with safe_open(str(file), framework="pt", device=device) as reader:
                for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, reader.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"Cannot read {file}: it is not a valid safetensors file ({error}).") from error


def read_metadata(file: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    try:
        with safe_open(str(file), framework="pt") as reader:
            return dict(reader.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"Cannot read {file}: it is not a valid safetensors file ({error}).") from error
