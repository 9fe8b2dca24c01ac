"""Decode one image safely: every failure becomes a ``BadImageError`` with a reason a person can act on.

Handles the awkward-but-valid cases (CMYK, 16-bit, palette, alpha, animated) by converting to 8-bit RGB, and refuses
empty, truncated, non-image and decompression-bomb files before they can take the process down.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError


class BadImageError(ValueError):
    """The file cannot be used as an image; the message says why."""


@dataclass
class DecodedImage:
    """An 8-bit RGB image plus notes on conversions that were applied (e.g. 'CMYK converted to RGB')."""

    image: Image.Image
    notes: list[str]


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the real range down to 8 bits instead of clipping at 255.
        notes.append(f"{image.mode} image scaled to 8-bit")
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda value: (value - low) * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Flatten on white: transparent pixels are often black underneath, which the model would describe.
        background = Image.new("RGB", image.size, "white")
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int, max_side: int | None = None) -> DecodedImage:
    """Decode ``data`` to RGB, downscaled so the longest side is at most ``max_side``; raise ``BadImageError``."""
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            # Check the header before decoding: a 1 kB PNG can claim 100,000 x 100,000 pixels.
            if width * height > max_pixels:
                raise BadImageError(
                    f"image is {width}x{height} = {width * height:,} pixels, above the max_image_pixels limit of {max_pixels:,}"
                    " (possible decompression bomb)"
                )
            notes: list[str] = []
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(f"animated: first of {frames} frames used")
                image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            image = _to_rgb(image, notes)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"not an image file that Pillow can read ({len(data):,} bytes)") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(f"decompression bomb refused: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadImageError(f"corrupt or truncated image: {error}") from None
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return DecodedImage(image=image, notes=notes)
