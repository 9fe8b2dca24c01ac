"""The recaption run's settings: one dataclass, every field with help text, validated in one place.

The command line in ``__main__`` is generated from these fields, and the UI writes the same fields as a JSON config
file, so every default lives here and nowhere else. Keys, types and ranges go through the config mechanism shared with
``TrainConfig`` (``training.typed_config``): ``overwrite: "no"`` is False, ``concurrency: "4"`` is 4, and a misspelled
key is an error naming the closest known one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lens_core.image_io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

from ..typed_config import apply_values, check_fields, coerce_fields, setting
from .templates import PRESETS, check_template

BACKENDS = ("openai", "local")
OUTPUT_FORMATS = ("sidecar", "jsonl", "webdataset", "parquet")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "8bit", "4bit")
# Lens-800M captions average about 109 words and at most 415 text tokens reach the denoiser (LENS_SPEC section 8).
LENS_CAPTION_WORDS = 109
LENS_TEXT_TOKEN_LIMIT = 415
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIDECAR_EXTENSION = re.compile(r"(\.[A-Za-z0-9_-]+)+")
# A sidecar with one of these endings would overwrite an image (photo.jpg's caption in photo.jpg) or a dataset file.
_NOT_SIDECARS = (*IMAGE_EXTENSIONS, ".json", ".jsonl", ".parquet", ".tar", ".yaml", ".yml")


@dataclass
class RecaptionConfig:
    """Everything one recaption run needs. Construct it, then call ``validate()`` (``from_dict`` does both)."""

    inputs: list[str] = setting(
        [], "Image folder(s) (searched recursively), webdataset .tar shard(s) or .parquet file(s).", cli="positional"
    )
    output_dir: str | None = setting(
        None,
        "Where captions go. Default: the input folder (sidecars next to the images). Another folder becomes a "
        "dataset of its own: the captioned images are hard-linked there (copied across file systems). Required for "
        ".tar/.parquet inputs. Progress, report and histogram go to its _lens/ subfolder.",
    )
    formats: list[str] = setting(
        ["sidecar"],
        f"Outputs to write, any of {', '.join(OUTPUT_FORMATS)} (jsonl = metadata.jsonl, the Hugging Face imagefolder "
        "convention).",
        choices=OUTPUT_FORMATS,
    )
    backend: str = setting("openai", f"Captioning backend: one of {', '.join(BACKENDS)}.", choices=BACKENDS)
    model: str = setting(
        "gpt-4.1-mini",
        "Model name sent to the server (openai) or a local model folder / Hub id already in the cache (local).",
    )
    base_url: str = setting(
        "https://api.openai.com/v1",
        "OpenAI-compatible server root, e.g. http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:11434/v1 (Ollama).",
    )
    api_key_env: str = setting(
        "OPENAI_API_KEY",
        "Name of the environment variable that holds the API key ('' for a server without a key). The key itself is "
        "never accepted on the command line.",
    )
    concurrency: int = setting(4, "Requests in flight at once (openai backend).", minimum=1)
    request_timeout: float = setting(120.0, "Seconds to wait for one server answer before retrying.", minimum=0)
    max_retries: int = setting(5, "Retries per image after 429, 5xx, timeouts, malformed or empty answers.", minimum=0)
    retry_base_delay: float = setting(
        1.0, "First backoff delay in seconds; doubles per retry (a Retry-After header wins).", minimum=0
    )
    max_image_side: int = setting(
        1024, "Longest side in pixels of the image sent to the model (downscaled, never upscaled).", minimum=1
    )
    batch_size: int = setting(4, "Images per generate() call (local backend).", minimum=1)
    precision: str = setting(
        "auto",
        f"Local model weights: one of {', '.join(PRECISIONS)}. auto = bf16 on a GPU, fp32 on CPU; 8bit/4bit need "
        "CUDA and bitsandbytes.",
        choices=PRECISIONS,
    )
    device: str = setting(
        "auto", "Local backend device: auto (the GPU of this process's rank when present, else CPU), cpu, cuda, cuda:N."
    )
    template: str = setting("dense", f"Prompt preset: one of {', '.join(PRESETS)}.", choices=tuple(PRESETS))
    prompt: str | None = setting(
        None,
        "A custom prompt template replacing the preset; variables: {original_caption} {hint} {tags} {file_name} "
        "{folder} {target_words}.",
    )
    target_words: int | None = setting(
        None, "Target caption length in words. Default: the preset's (dense: 100).", minimum=1, maximum=1000
    )
    max_new_tokens: int = setting(320, "Longest answer the model may generate, in tokens.", minimum=1)
    temperature: float = setting(0.2, "Sampling temperature (0 = greedy).", minimum=0)
    overwrite: bool = setting(
        False, "Caption again images that already have a caption from an earlier run (true/false, yes/no)."
    )
    shard: str = setting(
        "auto",
        "This process's part of the work as i/n with 0 <= i < n, e.g. 0/4. auto = RANK/WORLD_SIZE under accelerate "
        "or torchrun, else 0/1.",
    )
    limit: int | None = setting(
        None, "Caption at most this many images (after sharding and skipping); used by the preview.", minimum=0
    )
    caption_source: str = setting(
        "auto",
        "Where the original caption (the alt-text, passed to the model as a hint and kept) is read from: auto "
        "(metadata.jsonl, else .txt sidecars), a sidecar extension such as .txt, metadata.jsonl, or column:NAME.",
    )
    sidecar_extension: str = setting(
        ".txt",
        "Extension of the sidecar caption files written (e.g. .lens.txt keeps .txt alt-text files next to them).",
    )
    max_image_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "Refuse images with more pixels than this (decompression bombs).", minimum=1
    )
    tokenizer: str | None = setting(
        None,
        "Local folder of the GPT-OSS tokenizer for exact token counts; default: the Hugging Face cache if it holds "
        "openai/gpt-oss-20b, else an estimate.",
    )
    progress_bar: bool = setting(True, "Show a terminal progress bar (stderr).")

    # ------------------------------------------------------------------ validation
    def validate(self) -> RecaptionConfig:
        """Convert and check every field; raise ``ValueError`` naming the bad value and what is allowed. Returns
        ``self``."""
        coerce_fields(self)
        check_fields(self)
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one image folder, .tar shard or .parquet file")
        if not self.formats:
            raise ValueError(f"formats is empty: choose one or more of {', '.join(OUTPUT_FORMATS)}")
        # "" means no key (a local server). Do not echo the value: a user who pasted the key itself here must not
        # see it printed back into logs.
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (letters, digits, _), not the key itself"
            )
        extension = self.sidecar_extension
        if not _SIDECAR_EXTENSION.fullmatch(extension) or extension.lower().endswith(_NOT_SIDECARS):
            raise ValueError(
                f"sidecar_extension={extension!r} must be dot-separated letters, digits, _ or - (such as .txt, "
                f".lens.txt or .caption), and not end in an image or dataset extension ({', '.join(_NOT_SIDECARS)}): "
                "a caption written in place would overwrite that file"
            )
        if not (
            self.caption_source in ("auto", "metadata.jsonl")
            or (self.caption_source.startswith(".") and "/" not in self.caption_source)
            or (self.caption_source.startswith("column:") and len(self.caption_source) > 7)
        ):
            raise ValueError(
                f"caption_source={self.caption_source!r} must be auto, a sidecar extension such as .txt, "
                "metadata.jsonl or column:NAME"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must start with http:// or https://")
        if self.prompt:
            check_template(self.prompt)
        self.shard_position()
        return self

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
        """Build and validate a config; unknown keys are an error naming the closest known one."""
        config = cls()
        apply_values(config, values)
        return config.validate()

    @classmethod
    def from_json_file(cls, path: str | Path) -> RecaptionConfig:
        """Read a config written by ``to_json_file`` (the UI does this)."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the config file {path}: {error}") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (holds no secret: the key stays in the environment)."""
        return asdict(self)

    def to_json_file(self, path: str | Path) -> None:
        """Write the config as JSON for ``--config``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
