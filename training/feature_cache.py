"""The on-disk cache of what training reads: normalised packed latents and text features, computed once.

Entries are safetensors files named by a hash of their inputs (image content + bucket + VAE identity; rendered
caption + date + window + encoder identity), so a changed image, caption or setting gets a new entry and an
unchanged one is never recomputed. Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lens_core.lora import atomic_save_safetensors


def content_key(*parts) -> str:
    """A stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


class FeatureCache:
    """Latents [L, 128] and text features (4 x [S, hidden]) stored under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self._path(kind, key).is_file()

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self._path(kind, key), {}
        )

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self._path(kind, key)))

    def put_text(self, key: str, layers: list[torch.Tensor]) -> None:
        self.put("text", key, {f"layer{i}": layer for i, layer in enumerate(layers)})

    def get_text(self, key: str) -> list[torch.Tensor]:
        tensors = self.get("text", key)
        return [tensors[f"layer{i}"] for i in range(len(tensors))]
