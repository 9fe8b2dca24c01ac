"""The recaption run's settings: one dataclass, every field with help text, validated in one place.

The command line in ``__main__`` is generated from these fields, and the UI writes the same fields as a JSON config
file, so every default lives here and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .templates import PRESETS, check_template

BACKENDS = ("openai", "local")
OUTPUT_FORMATS = ("sidecar", "jsonl", "webdataset", "parquet")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "8bit", "4bit")
# Lens-800M captions average about 109 words and at most 415 text tokens reach the denoiser (LENS_SPEC section 8).
LENS_CAPTION_WORDS = 109
LENS_TEXT_TOKEN_LIMIT = 415
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class RecaptionConfig:
    """Everything one recaption run needs. Construct it, then call ``validate()`` (``from_dict`` does both)."""

    inputs: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Image folder(s) (searched recursively), webdataset .tar shard(s) or .parquet file(s).", cli="positional"
        ),
    )
    output_dir: str | None = field(
        default=None,
        metadata=_help(
            "Where captions, progress.jsonl and the report go. Default: the input folder (sidecars next to the images). Required for .tar/.parquet inputs."
        ),
    )
    formats: list[str] = field(
        default_factory=lambda: ["sidecar"],
        metadata=_help(
            f"Outputs to write, any of {', '.join(OUTPUT_FORMATS)} (jsonl = metadata.jsonl, the Hugging Face imagefolder convention)."
        ),
    )
    backend: str = field(default="openai", metadata=_help(f"Captioning backend: one of {', '.join(BACKENDS)}."))
    model: str = field(
        default="gpt-4.1-mini",
        metadata=_help(
            "Model name sent to the server (openai) or a local model folder / Hub id already in the cache (local)."
        ),
    )
    base_url: str = field(
        default="https://api.openai.com/v1",
        metadata=_help(
            "OpenAI-compatible server root, e.g. http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:11434/v1 (Ollama)."
        ),
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=_help(
            "Name of the environment variable that holds the API key. The key itself is never accepted on the command line."
        ),
    )
    concurrency: int = field(default=4, metadata=_help("Requests in flight at once (openai backend)."))
    request_timeout: float = field(
        default=120.0, metadata=_help("Seconds to wait for one server answer before retrying.")
    )
    max_retries: int = field(
        default=5, metadata=_help("Retries per image after 429, 5xx, timeouts, malformed or empty answers.")
    )
    retry_base_delay: float = field(
        default=1.0, metadata=_help("First backoff delay in seconds; doubles per retry (a Retry-After header wins).")
    )
    max_image_side: int = field(
        default=1024,
        metadata=_help("Longest side in pixels of the image sent to the model (downscaled, never upscaled)."),
    )
    batch_size: int = field(default=4, metadata=_help("Images per generate() call (local backend)."))
    precision: str = field(
        default="auto",
        metadata=_help(
            f"Local model weights: one of {', '.join(PRECISIONS)}. auto = bf16 on a GPU, fp32 on CPU; 8bit/4bit need CUDA and bitsandbytes."
        ),
    )
    device: str = field(
        default="auto",
        metadata=_help(
            "Local backend device: auto (the GPU of this process's rank when present, else CPU), cpu, cuda, cuda:N."
        ),
    )
    template: str = field(default="dense", metadata=_help(f"Prompt preset: one of {', '.join(PRESETS)}."))
    prompt: str | None = field(
        default=None,
        metadata=_help(
            "A custom prompt template replacing the preset; variables: {original_caption} {hint} {tags} {file_name} {folder} {target_words}."
        ),
    )
    target_words: int | None = field(
        default=None, metadata=_help("Target caption length in words. Default: the preset's (dense: 100).")
    )
    max_new_tokens: int = field(default=320, metadata=_help("Longest answer the model may generate, in tokens."))
    temperature: float = field(default=0.2, metadata=_help("Sampling temperature (0 = greedy)."))
    overwrite: bool = field(
        default=False, metadata=_help("Caption again images that already have a caption from an earlier run.")
    )
    shard: str = field(
        default="auto",
        metadata=_help(
            "This process's part of the work as i/n with 0 <= i < n, e.g. 0/4. auto = RANK/WORLD_SIZE under accelerate or torchrun, else 0/1."
        ),
    )
    limit: int | None = field(
        default=None,
        metadata=_help("Caption at most this many images (after sharding and skipping); used by the preview."),
    )
    sidecar_extension: str = field(
        default=".txt",
        metadata=_help("Extension of sidecar caption files; also where original captions are read from."),
    )
    max_image_pixels: int = field(
        default=100_000_000, metadata=_help("Refuse images with more pixels than this (decompression bombs).")
    )
    tokenizer: str | None = field(
        default=None,
        metadata=_help(
            "Local folder of the GPT-OSS tokenizer for exact token counts; default: the Hugging Face cache if it holds openai/gpt-oss-20b, else an estimate."
        ),
    )
    progress_bar: bool = field(default=True, metadata=_help("Show a terminal progress bar (stderr)."))

    # ------------------------------------------------------------------ validation
    def validate(self) -> RecaptionConfig:
        """Check every field; raise ``ValueError`` naming the bad value and what is allowed. Returns ``self``."""
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one image folder, .tar shard or .parquet file")
        self._check_choice("backend", self.backend, BACKENDS)
        self._check_choice("template", self.template, tuple(PRESETS))
        self._check_choice("precision", self.precision, PRECISIONS)
        if not self.formats:
            raise ValueError(f"formats is empty: choose one or more of {', '.join(OUTPUT_FORMATS)}")
        for name in self.formats:
            self._check_choice("formats", name, OUTPUT_FORMATS)
        for name in ("concurrency", "batch_size", "max_new_tokens", "max_image_side", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("request_timeout", "retry_base_delay", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries!r} must be >= 0")
        if self.target_words is not None and not 1 <= self.target_words <= 1000:
            raise ValueError(f"target_words={self.target_words!r} must be between 1 and 1000")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit={self.limit!r} must be >= 0")
        # "" means no key (a local server). Do not echo the value: a user who pasted the key itself here must not
        # see it printed back into logs.
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (letters, digits, _), not the key itself"
            )
        if not self.sidecar_extension.startswith(".") or "/" in self.sidecar_extension:
            raise ValueError(f"sidecar_extension={self.sidecar_extension!r} must start with '.' and hold no '/'")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must start with http:// or https://")
        if self.prompt:
            check_template(self.prompt)
        self.shard_position()
        return self

    @staticmethod
    def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")

    def shard_position(self) -> tuple[int, int]:
        """Return ``(index, count)`` from ``shard``; ``auto`` reads RANK/WORLD_SIZE set by accelerate or torchrun."""
        if self.shard == "auto":
            return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        match = re.fullmatch(r"(\d+)/(\d+)", self.shard)
        if not match or not int(match[1]) < int(match[2]):
            raise ValueError(f"shard={self.shard!r} must be 'auto' or i/n with 0 <= i < n, e.g. 0/4")
        return int(match[1]), int(match[2])

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RecaptionConfig:
        """Build and validate a config; unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; allowed keys: {', '.join(sorted(known))}")
        return cls(**values).validate()

    @classmethod
    def from_json_file(cls, path: str | Path) -> RecaptionConfig:
        """Read a config written by ``to_json_file`` (the UI does this)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (holds no secret: the key stays in the environment)."""
        return asdict(self)

    def to_json_file(self, path: str | Path) -> None:
        """Write the config as JSON for ``--config``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")


def field_default(item: Any) -> Any:
    """The default of a dataclass field, calling its factory when it has one."""
    if item.default is not MISSING:
        return item.default
    return item.default_factory()
