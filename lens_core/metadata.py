"""Generation settings embedded in PNG files, and read back from ours or from A1111-style images.

Two text chunks: `parameters` (the A1111 format that other tools read) and `lens` (JSON with everything needed to
reproduce the image). Reading walks the PNG's chunks and decodes only the text ones: the pixels are never decoded,
so a huge or hostile file costs a few reads, and its size is checked from the header alone.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin

from .atomic_io import atomic_build

JSON_CHUNK = "lens"
A1111_CHUNK = "parameters"
SAMPLER_NAME = "Euler (flow matching)"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow refuses to decode images above this many pixels as decompression bombs; no real settings PNG is larger.
MAX_PNG_PIXELS = 2 * 89_478_485
MAX_TEXT_CHUNK_BYTES = 1024 * 1024  # a settings chunk is a few KB; compressed text never inflates beyond this
MAX_PNG_CHUNKS = 1_000_000  # a 180-megapixel PNG has about 20 000 IDAT chunks; this only stops an endless file
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


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
        """Build from a dict, rejecting unknown keys, missing prompts and values of the wrong type instead of
        guessing. (Ranges are the engine's business: `GenerationRequest.from_image_settings` checks them.)"""
        if not isinstance(data, dict):
            raise ValueError(f"Image settings must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown image setting(s) {unknown}; known: {sorted(known)}.")
        if not isinstance(data.get("prompt"), str):
            raise ValueError("Image settings have no prompt.")
        for name, value in data.items():
            _check_setting_type(name, value)
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


_SETTING_TYPES = {
    "seed": "integer",
    "num_inference_steps": "integer",
    "width": "integer",
    "height": "integer",
    "guidance_scale": "number",
    "original_prompt": "text or null",
    "memory_mode": "text or null",
    "loras": "list",
}


def _check_setting_type(name: str, value) -> None:
    """Raise ValueError when a restored setting has the wrong JSON type (a bool is not a number here)."""
    kind = _SETTING_TYPES.get(name, "text")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": is_number and math.isfinite(value),
        "text": isinstance(value, str),
        "text or null": value is None or isinstance(value, str),
        "list": isinstance(value, list)
        and all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in value),
    }[kind]
    if not ok:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        what = (
            "a list of {'name': ..., 'weight': ...}" if kind == "list" else f"{'an' if kind[0] == 'i' else 'a'} {kind}"
        )
        raise ValueError(f"Image setting {name!r} must be {what}, got {shown} ({type(value).__name__}).")


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


# Keys are short ("CFG scale", "Lora style"); bounding them keeps the scan linear on hostile text.
_A1111_PAIR = re.compile(r'\s*([\w \-/]{1,64}):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')
MAX_A1111_CHARS = 64 * 1024


def parse_a1111(text: str) -> dict:
    """Parse an A1111 `parameters` text into our setting names (unknown keys are ignored; they are foreign tools')."""
    if len(text) > MAX_A1111_CHARS:
        raise ValueError(f"The parameters text has {len(text)} characters; settings take at most {MAX_A1111_CHARS}.")
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
    try:
        pairs = {
            key.strip(): (json.loads(value) if value.startswith('"') else value.strip())
            for key, value in _A1111_PAIR.findall(settings_line)
        }
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


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"it ends in the middle of {what} (the file is truncated).")
    return data


def _decode_text_chunk(kind: bytes, data: bytes) -> tuple[str, str]:
    """(keyword, text) of a tEXt / zTXt / iTXt chunk; compressed text is inflated to at most MAX_TEXT_CHUNK_BYTES."""
    keyword, separator, rest = data.partition(b"\0")
    if not separator or not 1 <= len(keyword) <= 79:
        raise ValueError(f"it has a malformed {kind.decode()} chunk (no keyword).")
    compressed = False
    if kind == b"zTXt":
        compressed, rest = True, rest[1:]
    elif kind == b"iTXt":
        if len(rest) < 2:
            raise ValueError("it has a malformed iTXt chunk.")
        compressed, rest = rest[0] == 1, rest[2:]
        _language, _, rest = rest.partition(b"\0")
        _translated, _, rest = rest.partition(b"\0")
    if compressed:
        inflater = zlib.decompressobj()
        try:
            rest = inflater.decompress(rest, MAX_TEXT_CHUNK_BYTES)
        except zlib.error as error:
            raise ValueError(f"its {keyword.decode('latin-1')!r} text is corrupt ({error}).") from None
        if inflater.unconsumed_tail:
            raise ValueError(
                f"its {keyword.decode('latin-1')!r} text inflates beyond {MAX_TEXT_CHUNK_BYTES} bytes; "
                "it is not generation settings."
            )
    encoding = "utf-8" if kind == b"iTXt" else "latin-1"
    return keyword.decode("latin-1"), rest.decode(encoding, errors="replace")


def read_png_text(stream: BinaryIO) -> dict[str, str]:
    """The text chunks of a PNG stream, without decoding any pixels (image data chunks are skipped by seeking).

    Checks the signature, the header's size (at most MAX_PNG_PIXELS) and each text chunk's checksum; raises
    ValueError naming the problem."""
    if stream.read(8) != PNG_SIGNATURE:
        raise ValueError("it is not a PNG file (wrong signature).")
    texts: dict[str, str] = {}
    for index in range(MAX_PNG_CHUNKS):
        length, kind = struct.unpack(">I4s", _read_exact(stream, 8, "a chunk header"))
        if length > 2**31 - 1 or not kind.isalpha():
            raise ValueError("it is not a valid PNG (a chunk header is corrupt).")
        if index == 0:
            if kind != b"IHDR" or length != 13:
                raise ValueError("it is not a valid PNG (the first chunk is not the header).")
            header = _read_exact(stream, 13, "the header")
            width, height = struct.unpack(">II", header[:8])
            if not width or not height or width * height > MAX_PNG_PIXELS:
                raise ValueError(
                    f"its header says {width}x{height} pixels; images with settings are at most {MAX_PNG_PIXELS} "
                    "pixels (and at least 1x1)."
                )
            _read_exact(stream, 4, "the header")
        elif kind in _TEXT_CHUNKS:
            if length > MAX_TEXT_CHUNK_BYTES:
                raise ValueError(f"it has a {length}-byte text chunk; settings take at most {MAX_TEXT_CHUNK_BYTES}.")
            data = _read_exact(stream, length, "a text chunk")
            (crc,) = struct.unpack(">I", _read_exact(stream, 4, "a text chunk"))
            if zlib.crc32(kind + data) != crc:
                raise ValueError("it is damaged (a text chunk fails its checksum).")
            keyword, text = _decode_text_chunk(kind, data)
            texts.setdefault(keyword, text)
        elif kind == b"IEND":
            return texts
        else:
            stream.seek(length + 4, 1)  # pixels and other chunks: never read
    raise ValueError(f"it has more than {MAX_PNG_CHUNKS} chunks.")


def _parse_json_settings(text: str) -> ImageSettings:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"The image's Lens settings are corrupt JSON: {error}") from error
    except RecursionError:
        raise ValueError("The image's Lens settings are corrupt JSON: nested too deeply to be settings.") from None
    return ImageSettings.from_dict(data)


def read_settings(source: str | Path | Image.Image) -> ImageSettings:
    """Settings from a PNG: our JSON chunk if present, else an A1111 `parameters` chunk. Raises ValueError otherwise.

    A path is read chunk by chunk (`read_png_text`): only the header and the text chunks, never the pixels."""
    if isinstance(source, Image.Image):
        text = dict(getattr(source, "text", {}) or {})
    else:
        try:
            with open(source, "rb") as stream:
                text = read_png_text(stream)
        except OSError as error:
            raise ValueError(f"Cannot read {Path(source).name}: it is not a readable image ({error}).") from error
        except ValueError as error:
            raise ValueError(f"Cannot read {Path(source).name}: it is not a readable image: {error}") from None
    if JSON_CHUNK in text:
        return _parse_json_settings(text[JSON_CHUNK])
    if A1111_CHUNK in text:
        return ImageSettings.from_dict(parse_a1111(text[A1111_CHUNK]))
    raise ValueError("This image carries no generation settings (no 'lens' or 'parameters' text chunk).")
