"""Writers: atomic sidecar files per image, the images of a separate output folder, and metadata.jsonl / webdataset /
Parquet outputs built at the end.

Every file is written to a temporary name in the same folder and renamed into place, so a killed run never leaves a
half-written caption: a reader sees the old file or the new one, nothing in between.

A separate output folder is a dataset of its own (the contract of `training.dataset`): each captioned image is placed
at `<output_dir>/<key><ext>` beside its caption, as a hard link (no extra disk) when both folders are on one file
system, else as a copy; images from .tar and .parquet inputs are written out. `metadata.jsonl` names them relative to
the folder, as the Hugging Face imagefolder convention wants.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from lens_core.atomic_io import atomic_build, atomic_write_bytes, atomic_write_text

from ..dataset import DatasetItem


def sidecar_path(output_dir: Path, key: str, extension: str) -> Path:
    """Where the caption of ``key`` goes: ``<output_dir>/<key><extension>`` (next to the image when in place)."""
    return output_dir / f"{key}{extension}"


def image_name(item: DatasetItem) -> str:
    """The image's name relative to the output folder: ``<key><original extension>``."""
    return f"{item.key}{PurePosixPath(item.file_name).suffix}"


def place_image(item: DatasetItem, output_dir: Path) -> Path:
    """Put the image of ``item`` at ``<output_dir>/<key><ext>`` (hard link, else copy); nothing to do if it is there."""
    target = output_dir / image_name(item)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if item.path is not None:
        temporary = target.with_name(f".{target.name}.link")
        try:
            temporary.unlink(missing_ok=True)
            os.link(item.path, temporary)
            os.replace(temporary, target)
            return target
        except OSError:  # another file system, or links not allowed: copy instead
            temporary.unlink(missing_ok=True)
    atomic_write_bytes(target, item.read_bytes())
    return target


def write_metadata_jsonl(path: Path, rows: Iterable[tuple[DatasetItem, dict]]) -> None:
    """metadata.jsonl rows: file_name (relative to its folder), text (the new caption), original_text, words, tokens,
    flags."""
    lines = []
    for item, record in rows:
        row = {
            "file_name": image_name(item),
            "text": record["caption"],
            "original_text": record.get("original_caption", ""),
        }
        row.update({name: record.get(name) for name in ("words", "tokens", "flags")})
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def write_webdataset(path: Path, rows: Iterable[tuple[DatasetItem, dict]]) -> None:
    """A webdataset shard: <key>.<ext> (the original image bytes), <key>.txt (the caption), <key>.json."""

    def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    def build(temporary: Path) -> None:
        with tarfile.open(temporary, "w") as archive:
            for item, record in rows:
                key = item.key.replace(".", "_")  # webdataset splits keys at the first dot
                add(archive, f"{key}{item.extension}", item.read_bytes())
                add(archive, f"{key}.txt", record["caption"].encode("utf-8"))
                meta = {
                    "original_text": record.get("original_caption", ""),
                    "words": record.get("words"),
                    "flags": record.get("flags"),
                }
                add(archive, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))

    atomic_build(path, build)


def write_parquet(path: Path, rows: Iterable[tuple[DatasetItem, dict]]) -> None:
    """Parquet with the Hugging Face image struct column plus key, text and original_text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"key": [], "image": [], "text": [], "original_text": []}
    for item, record in rows:
        columns["key"].append(item.key)
        columns["image"].append({"bytes": item.read_bytes(), "path": item.file_name})
        columns["text"].append(record["caption"])
        columns["original_text"].append(record.get("original_caption", ""))
    atomic_build(path, lambda temporary: pq.write_table(pa.table(columns), temporary))
