"""A hobbyist's photo folder in miniature, made in code: every awkward case the image reader handles, a broken file,
and alt-text sidecars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# key -> alt-text (the .txt sidecar next to the image); "plain" has none.
ALT_TEXT = {
    "rotated": "my cat on the sofa",
    "deep": "scan of an old negative",
    "glass": "a glass vase cut out",
    "loop": "funny dancing gif",
    "print": "poster from the print shop",
    "broken": "the one that got corrupted",
}
GOOD_KEYS = ("deep", "glass", "loop", "plain", "print", "rotated")
SIZE = 80


def _gradient(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.indices((SIZE, SIZE))
    base = np.stack([xs * 3, ys * 3, (xs + ys) * 2], axis=-1) % 256
    return (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)  # [H, W, 3]


def make_messy_folder(folder: Path) -> Path:
    """rotated.jpg (EXIF orientation 6), deep.png (16-bit), glass.png (RGBA), loop.gif (animated), print.jpg (CMYK),
    plain.png (no alt-text), broken.jpg (truncated), and the alt-text sidecars of ALT_TEXT."""
    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, shown tall
    Image.fromarray(_gradient(0)[: SIZE * 2 // 3]).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    sixteen = (np.indices((SIZE, SIZE))[1] * 800 + 2000).astype(np.uint16)  # 2000..65200
    Image.fromarray(sixteen).save(folder / "deep.png")
    rgba = np.dstack([_gradient(1), np.where(np.indices((SIZE, SIZE))[1] < SIZE // 2, 0, 200)]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "glass.png")
    frames = [Image.fromarray(_gradient(10 + index)) for index in range(3)]
    frames[0].save(folder / "loop.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    Image.fromarray(_gradient(2)).convert("CMYK").save(folder / "print.jpg", quality=95)
    Image.fromarray(_gradient(3)).save(folder / "plain.png")
    Image.fromarray(_gradient(4)).save(folder / "_whole.jpg", quality=95)
    whole = (folder / "_whole.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # the header is fine, the pixels stop half-way
    (folder / "_whole.jpg").unlink()
    for key, text in ALT_TEXT.items():
        (folder / f"{key}.txt").write_text(text + "\n")
    return folder
