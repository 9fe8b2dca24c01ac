"""Training data: the captioned images of a dataset (read through the contract in `training.dataset`), checked before
any model is loaded, and fitted to aspect buckets.

`inspect_dataset` reads the dataset, decodes every image once with `lens_core.image_io` (the same decoder Recaption
uses, so both see the same pixels), and sorts the images into usable (with their bucket), missing a caption, bad
(unreadable, with the reason) and too small. The result is written to `<output_dir>/data_report.json` by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from lens_core.atomic_io import atomic_write_text
from lens_core.image_io import DEFAULT_MAX_PIXELS, BadImageError, load_image, read_source
from lens_core.presets import TRAINING_BUCKETS

from .dataset import read_dataset

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be trained on, with what is wrong and how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One captioned image of a dataset: where it is (for messages), its key, its caption and how to read it."""

    source: str  # a path, "shard.tar::key" or "file.parquet row N"
    key: str
    caption: str
    read_bytes: object  # () -> bytes

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
        """The upright 8-bit RGB image (`lens_core.image_io`); `BadImageError` names this sample's source."""
        return load_image(self.read_bytes, name=self.source, max_pixels=max_pixels).image


def discover_samples(path: str | Path, *, format: str = "auto", caption_source: str = "auto") -> list[Sample]:  # noqa: A002
    """The captioned images of a dataset in a stable order; images without a caption are skipped with a warning,
    and a dataset with none is a `DatasetError`."""
    return _discover(path, format, caption_source)[0]


def _discover(path, format_name: str, caption_source: str) -> tuple[list[Sample], list[str], object]:
    try:
        dataset = read_dataset(path, format=format_name, caption_source=caption_source)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    for note in dataset.notes:
        logger.info("Dataset: %s", note)
    if not dataset.items:
        raise DatasetError(f"{path} holds no images ({dataset.format}; image files end in .png .jpg .jpeg .webp ...).")
    samples = [Sample(i.source, i.key, i.caption, i.read_bytes) for i in dataset.items if i.caption]
    missing = [item.source for item in dataset.items if not item.caption]
    if not samples:
        raise DatasetError(
            f"None of the {len(dataset.items)} images in {path} has a caption in {dataset.caption_source}: add "
            f"<stem>.txt files or a metadata.jsonl with file_name/text (Recaption writes them), or choose another "
            f"data.caption_source."
        )
    if missing:
        logger.warning(
            "%d of %d images have no caption in %s and are skipped (e.g. %s).",
            len(missing),
            len(dataset.items),
            dataset.caption_source,
            [Path(m).name for m in missing[:3]],
        )
    return samples, missing, dataset


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


@dataclass(frozen=True)
class PlannedSample:
    """A usable sample with its content hash (the cache key of its latents) and its bucket."""

    sample: Sample
    content_hash: str
    bucket: tuple[int, int]  # (width, height)


@dataclass
class DataReport:
    """What `inspect_dataset` found, as written to `data_report.json` (lists hold sources, with reasons)."""

    dataset: str
    format: str
    caption_source: str
    images: int
    usable: int
    missing_captions: list[str] = field(default_factory=list)
    bad_images: list[dict] = field(default_factory=list)  # {"source": ..., "reason": ...}
    too_small: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DataPlan:
    """The usable samples in order and the report."""

    samples: list[PlannedSample]
    report: DataReport


def _probe(sample: Sample, max_pixels: int) -> tuple[str, tuple[int, int]] | BadImageError:
    try:
        data = read_source(sample.read_bytes, sample.source)
        size = load_image(data, name=sample.source, max_pixels=max_pixels).image.size
    except BadImageError as error:
        return error
    return hashlib.sha256(data).hexdigest()[:32], size


def inspect_dataset(data, report_path: Path | None = None) -> DataPlan:
    """Read and decode every image of `data` (a `DataConfig`) once, before any model is loaded; write the report to
    `report_path` (also when the run cannot go on), then raise `DatasetError` when nothing is usable or the share of
    bad images is above `data.max_bad_fraction`."""
    samples, missing, dataset = _discover(data.path, data.format, data.caption_source)
    buckets = bucket_list(data.buckets)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes outside the GIL
        probes = list(pool.map(lambda s: _probe(s, data.max_image_pixels), samples))
    report = DataReport(str(data.path), dataset.format, dataset.caption_source, len(dataset.items), 0, missing)
    report.notes = list(dataset.notes)
    planned = []
    for sample, probe in zip(samples, probes, strict=True):
        if isinstance(probe, BadImageError):
            report.bad_images.append({"source": sample.source, "reason": probe.reason})
            continue
        content_hash, (width, height) = probe
        bucket = choose_bucket(width, height, buckets, data.max_upscale)
        if bucket is None:
            report.too_small.append(f"{sample.source} ({width}x{height})")
            continue
        planned.append(PlannedSample(sample, content_hash, bucket))
    report.usable = len(planned)
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    _check_report(report, data, buckets)
    return DataPlan(planned, report)


def _check_report(report: DataReport, data, buckets: list[tuple[int, int]]) -> None:
    for entry in report.bad_images:
        logger.warning("Skipping a bad image: %s: %s", entry["source"], entry["reason"])
    checked = report.images - len(report.missing_captions)
    bad_share = len(report.bad_images) / max(1, checked)
    if report.bad_images and bad_share > data.max_bad_fraction:
        raise DatasetError(
            f"{len(report.bad_images)} of {checked} captioned images are unreadable ({bad_share:.0%}, above "
            f"data.max_bad_fraction={data.max_bad_fraction:g}), e.g. "
            + "; ".join(f"{e['source']}: {e['reason']}" for e in report.bad_images[:3])
            + ". Fix or remove them (Recaption's report lists them too), or raise data.max_bad_fraction."
        )
    smallest = min(buckets, key=lambda b: b[0] * b[1])
    if not report.usable:
        raise DatasetError(
            f"No usable image in {report.dataset}: {len(report.bad_images)} unreadable, {len(report.too_small)} below "
            f"the smallest bucket {smallest[0]}x{smallest[1]} even with data.max_upscale={data.max_upscale} "
            f"(e.g. {report.too_small[:3]}): use larger images, a smaller bucket set, or raise data.max_upscale."
        )
    if report.too_small:
        logger.warning(
            "%d images are below the smallest bucket %dx%d and are skipped: %s",
            len(report.too_small),
            *smallest,
            report.too_small[:5],
        )
