"""Writers: atomic sidecar files per image, and metadata.jsonl / webdataset / Parquet outputs built at the end.

Every file is written to a temporary name in the same folder and renamed into place, so a killed run never leaves a
half-written caption: a reader sees the old file or the new one, nothing in between.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from lens_core.atomic_io import atomic_build, atomic_write_text

from .datasets import SourceItem


def sidecar_path(output_dir: Path, key: str, extension: str) -> Path:
    """Where the caption of ``key`` goes: ``<output_dir>/<key><extension>`` (next to the image when in place)."""
    return output_dir / f"{key}{extension}"


def _file_name(item: SourceItem, output_dir: Path) -> str:
    # imagefolder convention: file_name is relative to the folder holding metadata.jsonl.
    if item.path is not None:
        return Path(os.path.relpath(item.path.resolve(), output_dir.resolve())).as_posix()
    return f"{item.key}{item.extension}"


def write_metadata_jsonl(path: Path, rows: Iterable[tuple[SourceItem, dict]], output_dir: Path) -> None:
    """metadata.jsonl rows: file_name, text (the new caption), original_text, words, tokens, flags."""
    lines = []
    for item, record in rows:
        row = {
            "file_name": _file_name(item, output_dir),
            "text": record["caption"],
            "original_text": item.original_caption,
        }
        row.update({name: record.get(name) for name in ("words", "tokens", "flags")})
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def write_webdataset(path: Path, rows: Iterable[tuple[SourceItem, dict]]) -> None:
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
                    "original_text": item.original_caption,
                    "words": record.get("words"),
                    "flags": record.get("flags"),
                }
                add(archive, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))

    atomic_build(path, build)


def write_parquet(path: Path, rows: Iterable[tuple[SourceItem, dict]]) -> None:
    """Parquet with the Hugging Face image struct column plus key, text and original_text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"key": [], "image": [], "text": [], "original_text": []}
    for item, record in rows:
        columns["key"].append(item.key)
        columns["image"].append({"bytes": item.read_bytes(), "path": item.file_name})
        columns["text"].append(record["caption"])
        columns["original_text"].append(item.original_caption)
    atomic_build(path, lambda temporary: pq.write_table(pa.table(columns), temporary))
