"""Generation settings embedded in PNG files, and read back from ours or from A1111-style images.

Two text chunks: `parameters` (the A1111 format that other tools read) and `lens` (JSON with everything needed to
reproduce the image).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from PIL import Image, PngImagePlugin

from .atomic_io import atomic_build

JSON_CHUNK = "lens"
A1111_CHUNK = "parameters"
SAMPLER_NAME = "Euler (flow matching)"


@dataclass
class ImageSettings:
    """Everything that determines a Lens image (and what it came from)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    width: int = 1024
    height: int = 1024
    variant: str = "Lens"
    model: str = ""
    prompt_date: str = ""
    original_prompt: str | None = None  # before the prompt rewriter, if it was used
    loras: list[dict] = field(default_factory=list)  # [{"name": ..., "weight": ...}]
    memory_mode: str | None = None
    software: str = "lens-studio"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ImageSettings:
        """Build from a dict, rejecting unknown keys and missing prompts instead of guessing."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown image setting(s) {unknown}; known: {sorted(known)}.")
        if not isinstance(data.get("prompt"), str):
            raise ValueError("Image settings have no prompt.")
        return cls(**data)

    def to_a1111(self) -> str:
        """The A1111 `parameters` text: prompt, optional negative line, then one line of `Key: value` pairs."""
        pairs = [
            ("Steps", self.num_inference_steps),
            ("Sampler", SAMPLER_NAME),
            ("CFG scale", self.guidance_scale),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.variant),
        ]
        if self.model:
            pairs.append(("Model path", self.model))
        for lora in self.loras:
            pairs.append((f"Lora {lora.get('name')}", lora.get("weight")))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs))
        return "\n".join(lines)


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text) else text


def png_info(settings: ImageSettings) -> PngImagePlugin.PngInfo:
    """Text chunks to pass as `pnginfo=` to `Image.save`."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(A1111_CHUNK, settings.to_a1111())
    info.add_itxt(JSON_CHUNK, settings.to_json())
    return info


def save_png(image: Image.Image, path: str | Path, settings: ImageSettings) -> Path:
    """Write `image` with its settings atomically (temp file + rename), so a crash never leaves half a PNG."""
    info = png_info(settings)
    return atomic_build(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


_A1111_PAIR = re.compile(r'\s*([\w \-/]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """Parse an A1111 `parameters` text into our setting names (unknown keys are ignored; they are foreign tools')."""
    lines = text.strip().split("\n")
    if not lines or not lines[-1].strip():
        raise ValueError("The parameters text is empty.")
    settings_line = lines[-1] if re.match(r"^\s*Steps:", lines[-1]) else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result: dict = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": "\n".join(negative_lines).strip()}
    pairs = {
        key.strip(): (json.loads(value) if value.startswith('"') else value.strip())
        for key, value in _A1111_PAIR.findall(settings_line)
    }
    try:
        if "Steps" in pairs:
            result["num_inference_steps"] = int(pairs["Steps"])
        if "CFG scale" in pairs:
            result["guidance_scale"] = float(pairs["CFG scale"])
        if "Seed" in pairs:
            result["seed"] = int(pairs["Seed"])
        if "Size" in pairs:
            width, height = pairs["Size"].lower().split("x")
            result["width"], result["height"] = int(width), int(height)
    except ValueError as error:
        raise ValueError(f"The parameters text has an unreadable value: {error}") from error
    if pairs.get("Model") in ("Lens", "Lens-Turbo", "Lens-Base"):
        result["variant"] = pairs["Model"]
    return result


def read_settings(source: str | Path | Image.Image) -> ImageSettings:
    """Settings from a PNG: our JSON chunk if present, else an A1111 `parameters` chunk. Raises ValueError otherwise."""
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read {source}: it is not a readable image ({error}).") from error
    text = dict(getattr(image, "text", {}) or {})
    if JSON_CHUNK in text:
        try:
            data = json.loads(text[JSON_CHUNK])
        except json.JSONDecodeError as error:
            raise ValueError(f"The image's Lens settings are corrupt JSON: {error}") from error
        return ImageSettings.from_dict(data)
    if A1111_CHUNK in text:
        return ImageSettings.from_dict(parse_a1111(text[A1111_CHUNK]))
    raise ValueError("This image carries no generation settings (no 'lens' or 'parameters' text chunk).")
