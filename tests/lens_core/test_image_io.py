"""The one image reader: orientation, bit depth, modes, alpha, animation, the pixel limit and bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lens_core.image_io import ALPHA_BACKGROUND, BadImageError, image_size, load_image


def _exif_rotated_jpeg(path, orientation: int = 6) -> None:
    """A 60x40 JPEG (wide as stored) whose EXIF says 'turn 90 degrees': it is 40x60 (tall) as displayed."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :20] = (250, 10, 10)  # a red band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_exif_orientation_gives_the_displayed_size_and_pixels(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_rotated_jpeg(path)
    loaded = load_image(path)
    assert loaded.image.size == (40, 60) == image_size(path)
    pixels = np.asarray(loaded.image)
    assert pixels[:20, :, 0].mean() > 200 and pixels[-20:, :, 0].mean() < 60  # the red band is now on top
    assert "EXIF orientation 6 applied" in loaded.notes


def test_sixteen_bit_keeps_its_brightness(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.new("I;16", (8, 8), 40000).save(path)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert np.asarray(loaded.image).mean() == pytest.approx(40000 / 257, abs=1)  # 156, not white, not stretched


def test_alpha_palette_cmyk_and_animation(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png").image)[0, 0].tolist() == list(ALPHA_BACKGROUND)
    half = load_image_bytes(Image.new("RGBA", (4, 4), (0, 0, 255, 128)), "PNG")
    assert np.asarray(half)[0, 0].tolist() == [127, 127, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 200, 30] + [0] * 765)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    assert np.asarray(load_image(tmp_path / "palette.png").image)[0, 0].tolist() == list(ALPHA_BACKGROUND)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.notes == ["CMYK converted to RGB"] and np.asarray(cmyk.image)[0, 0, 0] > 200  # red
    frames = [Image.new("RGB", (6, 6), (200 - 90 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    animated = load_image(tmp_path / "anim.gif")
    assert animated.notes == ["animated: first of 3 frames used"] and np.asarray(animated.image)[0, 0, 0] > 150


def load_image_bytes(image: Image.Image, format: str) -> Image.Image:  # noqa: A002
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return load_image(buffer.getvalue()).image


def test_max_side_downscales_only(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png", max_side=20).image.size == (20, 10)
    assert load_image(tmp_path / "wide.png", max_side=400).image.size == (100, 50)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: path.write_bytes(b""), "empty file"),
        (lambda path: path.write_text("plain text"), "not an image"),
        (lambda path: path.write_bytes(_png_claiming(12_000, 12_000)), "above the limit of 100,000,000"),
        (lambda path: path.write_bytes(_png_claiming(40_000, 40_000)), "decompression bomb"),
    ],
)
def test_bad_files_name_path_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(BadImageError, match=reason) as raised:
        load_image(path)
    assert raised.value.path == str(path) and str(path) in str(raised.value)


def test_truncated_jpeg_and_unreadable_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert image_size(truncated) == (64, 64)  # the header is intact: only decoding finds the damage
    with pytest.raises(BadImageError, match="truncated") as raised:
        load_image(truncated)
    assert raised.value.path == str(truncated)
    with pytest.raises(BadImageError, match="cannot read file"):
        load_image(tmp_path / "missing.png")
