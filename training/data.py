"""Training data: reading captioned images from folders, webdataset tars and Parquet, and fitting them to buckets.

Accepted layouts (what the Recaption tool writes, and the common hub formats):
- a folder of images with `<stem>.txt` caption sidecars and/or `metadata.jsonl` lines `{"file_name": ..., "text": ...}`
  (Hugging Face imagefolder; the jsonl caption wins when both exist);
- a webdataset `.tar` (or a folder of them): members `<key>.jpg|png|webp` + `<key>.txt`;
- a `.parquet` file with an image column (bytes or {"bytes": ...}) and a `text` / `caption` column.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from lens_core.presets import TRAINING_BUCKETS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("text", "caption", "prompt")
IMAGE_COLUMNS = ("image", "img", "jpg", "png")


class DatasetError(ValueError):
    """A dataset that cannot be trained on, with what is wrong and how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One captioned image: where it came from, its bytes' hash and its caption."""

    source: str  # a path, or "archive::member" for tars and parquet rows
    caption: str
    content_hash: str
    image_bytes: bytes | None = None  # tars and parquet keep the bytes; folders read the file on demand

    def open_image(self) -> PIL.Image.Image:
        data = self.image_bytes if self.image_bytes is not None else Path(self.source).read_bytes()
        image = PIL.Image.open(io.BytesIO(data))
        return image.convert("RGB")


def _hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _folder_samples(folder: Path) -> list[Sample]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    captions: dict[Path, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[(folder / row["file_name"]).resolve()] = str(row.get("text", row.get("caption", "")))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DatasetError(
                    f"{metadata} line {number} is not a JSON object with 'file_name' and 'text': {error}"
                ) from error
    samples, missing = [], []
    for image in images:
        caption = captions.get(image.resolve())
        sidecar = image.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        if not caption:
            missing.append(image.name)
            continue
        samples.append(Sample(str(image), caption, _hash_bytes(image.read_bytes())))
    _report_missing(folder, missing, len(images))
    return samples


def _report_missing(source: Path, missing: list[str], total: int) -> None:
    if missing and len(missing) == total:
        raise DatasetError(
            f"None of the {total} images in {source} has a caption: add <stem>.txt files or a metadata.jsonl with "
            f"file_name/text (the Recaption tab writes both)."
        )
    if missing:
        logger.warning("%d of %d images have no caption and are skipped (e.g. %s).", len(missing), total, missing[:3])


def _tar_samples(archive: Path) -> list[Sample]:
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    samples, missing, total = [], [], 0
    for key in sorted(groups):
        parts = groups[key]
        image = next((parts[e] for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
        if image is None:
            continue
        total += 1
        caption = parts.get("txt", b"").decode("utf-8").strip()
        if not caption:
            missing.append(key)
            continue
        samples.append(Sample(f"{archive}::{key}", caption, _hash_bytes(image), image))
    if total == 0:
        raise DatasetError(f"{archive} holds no images (webdataset members <key>.png|jpg|webp + <key>.txt).")
    _report_missing(archive, missing, total)
    return samples


def _parquet_samples(path: Path) -> list[Sample]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = table.column_names
    text_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if text_column is None or image_column is None:
        raise DatasetError(
            f"{path} needs an image column ({IMAGE_COLUMNS}) and a caption column ({CAPTION_COLUMNS}); it has {columns}."
        )
    samples, missing = [], []
    for index, (image, text) in enumerate(
        zip(table[image_column].to_pylist(), table[text_column].to_pylist(), strict=True)
    ):
        data = image.get("bytes") if isinstance(image, dict) else image
        if not text:
            missing.append(str(index))
            continue
        samples.append(Sample(f"{path}::{index}", str(text).strip(), _hash_bytes(data), data))
    if table.num_rows == 0:
        raise DatasetError(f"{path} has no rows.")
    _report_missing(path, missing, table.num_rows)
    return samples


def discover_samples(path: str | Path) -> list[Sample]:
    """All captioned images of a dataset, in a stable order."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"Dataset {path} does not exist.")
    if path.is_file() and path.suffix == ".tar":
        return _tar_samples(path)
    if path.is_file() and path.suffix == ".parquet":
        return _parquet_samples(path)
    if path.is_dir():
        tars, parquets = sorted(path.glob("*.tar")), sorted(path.glob("*.parquet"))
        if tars or parquets:
            return [s for file in tars for s in _tar_samples(file)] + [
                s for file in parquets for s in _parquet_samples(file)
            ]
        return _folder_samples(path)
    raise DatasetError(f"{path} is not a dataset: give an image folder, a webdataset .tar or a .parquet file.")


# ----------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------


def bucket_list(spec: str | list) -> list[tuple[int, int]]:
    """(width, height) pairs: 'lens' = all 27, 'lens-512' etc. one area row, or an explicit list."""
    if isinstance(spec, list):
        return [(int(w), int(h)) for w, h in spec]
    if spec == "lens":
        return [size for row in TRAINING_BUCKETS.values() for size in row.values()]
    area = int(spec.removeprefix("lens-"))
    return list(TRAINING_BUCKETS[area].values())


def choose_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], max_upscale: float
) -> tuple[int, int] | None:
    """The bucket to train an image at: the nearest aspect ratio among the buckets it covers without upscaling
    past `max_upscale`, the largest of those; None when the image is too small for every bucket."""
    reachable = [(bw, bh) for bw, bh in buckets if max(bw / width, bh / height) <= max_upscale]
    if not reachable:
        return None
    aspect = np.log(width / height)
    # Nearest aspect ratio first (minimal crop), then the largest area of that ratio (most detail kept).
    return min(reachable, key=lambda b: (round(abs(np.log(b[0] / b[1]) - aspect), 3), -b[0] * b[1]))


def fit_to_bucket(image: PIL.Image.Image, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize so the image covers the bucket, centre-crop the excess; -> [3, H, W] in [-1, 1]."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), PIL.Image.Resampling.LANCZOS
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


def assign_buckets(
    samples: list[Sample], buckets: list[tuple[int, int]], max_upscale: float
) -> dict[int, tuple[int, int]]:
    """Index -> bucket for every usable sample; too-small images are reported, and all too small is an error."""
    assigned, too_small = {}, []
    for index, sample in enumerate(samples):
        with PIL.Image.open(
            io.BytesIO(sample.image_bytes) if sample.image_bytes is not None else sample.source
        ) as image:
            size = image.size
        bucket = choose_bucket(size[0], size[1], buckets, max_upscale)
        if bucket is None:
            too_small.append(f"{Path(sample.source.split('::')[0]).name} ({size[0]}x{size[1]})")
        else:
            assigned[index] = bucket
    smallest = min(buckets, key=lambda b: b[0] * b[1])
    if not assigned:
        raise DatasetError(
            f"Every image is below the smallest bucket {smallest[0]}x{smallest[1]} even with data.max_upscale="
            f"{max_upscale} (e.g. {too_small[:3]}): use larger images, a smaller bucket set, or raise max_upscale."
        )
    if too_small:
        logger.warning(
            "%d images are below the smallest bucket %dx%d and are skipped: %s",
            len(too_small),
            *smallest,
            too_small[:5],
        )
    return assigned
