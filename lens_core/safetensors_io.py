"""Reading and writing safetensors checkpoints (single files, sharded folders with an index) with clear errors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_io import atomic_build, atomic_write_text

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


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size string such as "5GB" or "500MiB" (the `max_shard_size` convention)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def save_sharded(
    folder: str | Path,
    tensors: list[tuple[str, int, Callable[[], torch.Tensor]]],
    weights_name: str,
    max_shard_bytes: int,
    variant: str | None = None,
) -> list[Path]:
    """Write (name, num_bytes, load) entries as safetensors shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own), in the Hugging Face naming: `model.safetensors` when one file is enough, else
    `model[.variant]-00001-of-0000N.safetensors` plus `model.safetensors.index[.variant].json`. Each tensor is loaded
    only while its shard is written; every file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = weights_name.removesuffix(".safetensors")
    shards: list[list[tuple[str, int, Callable[[], torch.Tensor]]]] = [[]]
    shard_bytes = 0
    for entry in tensors:
        if shards[-1] and shard_bytes + entry[1] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += entry[1]
    suffix = f".{variant}" if variant else ""
    if len(shards) == 1:
        names = [f"{stem}{suffix}.safetensors"]
    else:
        names = [f"{stem}{suffix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        part = {tensor_name: load().contiguous() for tensor_name, _size, load in shard}
        atomic_build(folder / name, lambda path, part=part: save_file(part, str(path), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(part, name))
        del part
    written = [folder / name for name in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(size for _n, size, _l in tensors)}, "weight_map": weight_map}
        written.append(atomic_write_text(folder / f"{weights_name}.index{suffix}.json", json.dumps(index, indent=2)))
    return written
