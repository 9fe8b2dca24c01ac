"""An in-memory cache of GPT-OSS text features: each distinct prompt runs through the 20 B encoder once.

Keyed by the rendered text (preamble date included), the encoder's identity and `max_sequence_length`, so changing
the seed, steps, size, guidance or LoRAs never runs the encoder again. Features are kept in CPU memory (about
4.6 MB for a 200-token prompt in bf16) and evicted least-recently-used beyond `max_bytes`.

    pipe.text_feature_cache = TextFeatureCache()
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .prompt import render_prompt

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 2**20


@dataclass
class CachedFeatures:
    """One prompt's features without padding: one [S, hidden] tensor per selected layer (CPU)."""

    embeds: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.embeds[0].shape[0]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.embeds)


def encoder_identity(pipe) -> str:
    """A label unique to this loaded encoder + tokenizer (a fresh id per object, so a reloaded model never matches)."""
    encoder = pipe.text_encoder
    token = getattr(encoder, "_lens_cache_identity", None)
    if token is None:
        token = uuid.uuid4().hex
        encoder._lens_cache_identity = token
    layers = ",".join(str(i) for i in pipe.selected_layers)
    return f"{type(encoder).__name__}:{token}:layers={layers}:tokenizer={getattr(pipe.tokenizer, 'name_or_path', '')}"


class TextFeatureCache:
    """LRU cache of per-prompt features, consulted by `LensPipeline._encode_texts`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, CachedFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Forget every entry (e.g. after loading another model)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @staticmethod
    def key(pipe, text: str, max_sequence_length: int) -> str:
        """sha256 of the rendered text, the encoder identity, the sequence budget and how it truncates."""
        rendered = render_prompt(text, pipe.prompt_date, pipe.strip_control_markers)
        payload = f"{encoder_identity(pipe)}\n{max_sequence_length}\n{pipe.prompt_truncation}\n{rendered}"
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def encode(self, pipe, texts: list[str], max_sequence_length: int, device):
        """Features for `texts` as one right-padded batch, the same as `pipe._run_text_encoder` would return; only
        the texts not in the cache go through the encoder (in one batch)."""
        from .pipeline_lens import PromptFeatures

        keys = [self.key(pipe, text, max_sequence_length) for text in texts]
        with self._lock:
            found = {key: self._entries[key] for key in keys if key in self._entries}
            for key in found:
                self._entries.move_to_end(key)
        missing = list(dict.fromkeys(key for key in keys if key not in found))  # unique, in order
        self.hits += sum(key in found for key in keys)
        self.misses += len(missing)
        if missing:
            text_for_key = dict(zip(keys, texts, strict=True))
            computed = pipe._run_text_encoder([text_for_key[key] for key in missing], max_sequence_length, "cpu")
            for row, key in enumerate(missing):
                length = int(computed.mask[row].sum())  # right padding: the real tokens come first
                found[key] = CachedFeatures([layer[row, :length].clone() for layer in computed.embeds])  # [S_i, H]
            self._store({key: found[key] for key in missing})
        entries = [found[key] for key in keys]
        length = max(entry.length for entry in entries)
        embeds = [
            torch.stack(
                [torch.nn.functional.pad(entry.embeds[layer], (0, 0, 0, length - entry.length)) for entry in entries]
            )
            for layer in range(len(entries[0].embeds))
        ]  # each [B, S, H]
        mask = torch.stack([torch.arange(length) < entry.length for entry in entries])  # [B, S] bool
        return PromptFeatures([t.to(device) for t in embeds], mask.to(device))

    def _store(self, new: dict[str, CachedFeatures]) -> None:
        with self._lock:
            for key, entry in new.items():
                if key in self._entries:
                    continue
                self._entries[key] = entry
                self._bytes += entry.num_bytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _key, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.num_bytes
