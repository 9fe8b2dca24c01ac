"""Reading images the one way every part of the project does: recaption, training, the latent cache and the app.

`load_image` turns any file Pillow can read into the 8-bit RGB picture a person sees in an image viewer:
- the EXIF orientation is applied (a phone photo stored sideways is upright, so its size is the displayed size);
- 16-bit and 32-bit integer samples are scaled to 8 bits (value / 257: a 16-bit PNG keeps its brightness instead of
  clipping to white or being contrast-stretched); float images in [0, 1] are scaled by 255, others clipped to 0..255;
- palette, greyscale, bilevel, CMYK and other modes become RGB (Pillow's conversions; ICC profiles are not applied);
- transparency (alpha channels, palette or tRNS transparency) is composited on `ALPHA_BACKGROUND`, white, because
  transparent pixels are often black underneath and a model would otherwise describe or learn that black;
- animations (GIF, APNG, WebP, multi-page TIFF) use their first frame.

Before decoding, the header size is checked against a pixel limit (a 1 kB PNG can claim 100,000 x 100,000 pixels), and
every failure (empty, truncated, not an image, unreadable, too large) is one `BadImageError(path, reason)`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels become: white
DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000; anything larger is refused before it is decoded
EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that turn the picture by 90 degrees


class BadImageError(ValueError):
    """A file that cannot be used as an image: `path` names it, `reason` says why in words a person can act on."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class LoadedImage:
    """An 8-bit RGB image and the conversions that were applied to get it (e.g. 'CMYK converted to RGB')."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)


ImageSource = str | Path | bytes | Callable[[], bytes]  # a path, the bytes, or a function returning them


def read_source(source: ImageSource, name: str) -> bytes:
    """The bytes of an image source; an unreadable one (permissions, a vanished file) is a `BadImageError`."""
    if isinstance(source, bytes):
        return source
    try:
        return source() if callable(source) else Path(source).read_bytes()
    except OSError as error:  # permissions, a vanished file, a folder: a bad item, not a crash
        raise BadImageError(name, f"cannot read file: {error.strerror or error}") from None


def _name(source: ImageSource, name: str | None) -> str:
    if name:
        return name
    return str(source) if isinstance(source, (str, Path)) else "<image bytes>"


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse sizes above `max_pixels` before any pixel is decoded."""
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImageError(name, f"not an image file that Pillow can read ({len(data):,} bytes)") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(name, f"decompression bomb refused: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadImageError(name, f"corrupt or truncated image header: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_image_pixels if the image is real)",
        )
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # a broken EXIF block: the pixels may still be fine
        return 1


def image_size(source: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """(width, height) as displayed (EXIF orientation applied), from the header only; `BadImageError` if unusable."""
    name = _name(source, name)
    with _open(read_source(source, name), name, max_pixels) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def _integer_to_8bit(image: Image.Image, notes: list[str]) -> Image.Image:
    notes.append(f"{image.mode} image scaled to 8-bit")
    values = np.asarray(image.convert("I") if image.mode.startswith("I;16") else image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def _float_to_8bit(image: Image.Image, notes: list[str]) -> Image.Image:
    notes.append("float image scaled to 8-bit")
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Any decoded Pillow image -> 8-bit RGB by the rules of this module (orientation is applied by the caller)."""
    notes = notes if notes is not None else []
    if image.mode.startswith("I"):
        image = _integer_to_8bit(image, notes)
    elif image.mode == "F":
        image = _float_to_8bit(image, notes)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append("transparent pixels composited on white")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> LoadedImage:
    """Decode an image (a path, its bytes, or a function returning them) to upright 8-bit RGB; `max_side` downscales
    (never upscales) so the longest side is at most that. `name` is what errors call the image (default: the path).
    Raises `BadImageError`."""
    name = _name(source, name)
    data = read_source(source, name)
    notes: list[str] = []
    try:
        with _open(data, name, max_pixels) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                notes.append(f"animated: first of {frames} frames used")
                opened.seek(0)
            orientation = _orientation(opened)
            opened.load()
            image = ImageOps.exif_transpose(opened) if orientation != 1 else opened.copy()
    except BadImageError:  # from _open: already says what is wrong
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # the pixel data: truncated, corrupt
        raise BadImageError(name, f"corrupt or truncated image: {error}") from None
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    image = to_rgb(image, notes)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return LoadedImage(image=image, notes=notes)
