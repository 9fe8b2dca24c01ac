"""Dataset readers: image folders (with .txt sidecars or metadata.jsonl), webdataset .tar shards and Parquet.

Every reader yields ``SourceItem`` objects in a stable, sorted order with a unique ``key`` (the relative path without
extension), so sharding and resuming select the same images on every run. Image bytes are read lazily.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FIELDS = ("text", "caption", "alt_text", "alt", "prompt")
# Files the runner itself writes into the output folder: never treat them as dataset content.
BOOKKEEPING_NAMES = ("progress.jsonl", "recaption_report.json", "recaption_histogram.png", "recaption_config.json")


@dataclass
class SourceItem:
    """One image to caption, where it came from, and the text that came with it."""

    key: str  # unique id, posix relative path without extension ("cats/001")
    file_name: str  # "001.jpg"
    folder: str  # "cats" ('' at the top)
    read_bytes: Callable[[], bytes]
    original_caption: str = ""
    tags: str = ""
    path: Path | None = None  # the image file, for folder inputs

    @property
    def extension(self) -> str:
        return PurePosixPath(self.file_name).suffix.lower()


def _metadata_captions(root: Path) -> dict[Path, dict[str, str]]:
    """Map image path -> {'text', 'tags'} from every metadata.jsonl under ``root`` (file_name is relative to it)."""
    found: dict[Path, dict[str, str]] = {}
    for metadata in sorted(root.rglob("metadata.jsonl")):
        for number, line in enumerate(metadata.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = (metadata.parent / row["file_name"]).resolve()
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s line %d: not a JSON object with a file_name; ignored", metadata, number)
                continue
            text = next((str(row[name]) for name in CAPTION_FIELDS if row.get(name)), "")
            tags = row.get("tags", "")
            found[image] = {"text": text, "tags": ", ".join(tags) if isinstance(tags, list) else str(tags)}
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def iter_folder(root: Path, *, sidecar_extension: str, exclude: Path | None = None) -> Iterator[SourceItem]:
    """Images under ``root`` (recursive, hidden folders skipped); original captions from sidecars or metadata.jsonl."""
    metadata = _metadata_captions(root)
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if exclude is not None and exclude != root and path.is_relative_to(exclude):
            continue
        if path.name in BOOKKEEPING_NAMES or not path.is_file():
            continue
        row = metadata.get(path.resolve(), {})
        yield SourceItem(
            key=relative.with_suffix("").as_posix(),
            file_name=path.name,
            folder=relative.parent.as_posix() if relative.parent != Path(".") else "",
            read_bytes=path.read_bytes,
            original_caption=_read_text(path.with_suffix(sidecar_extension)) or row.get("text", ""),
            tags=row.get("tags", ""),
            path=path,
        )


def _tar_member_reader(tar_path: Path, offset: int, size: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with tar_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    return read


def iter_webdataset(tar_path: Path) -> Iterator[SourceItem]:
    """Samples of one webdataset shard: members grouped by key (name up to the first dot after the last '/')."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, extension = base.partition(".")
            samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = member
        texts = {key: _tar_texts(archive, members) for key, members in samples.items()}
    for key in sorted(samples):
        members = samples[key]
        image_ext = next((ext for ext in members if "." + ext in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            continue
        member = members[image_ext]
        yield SourceItem(
            key=f"{tar_path.stem}/{key}",
            file_name=f"{PurePosixPath(key).name}.{image_ext}",
            folder=tar_path.stem,
            read_bytes=_tar_member_reader(tar_path, member.offset_data, member.size),
            original_caption=texts[key][0],
            tags=texts[key][1],
        )


def _tar_texts(archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[str, str]:
    def text_of(extension: str) -> str:
        if extension not in members:
            return ""
        handle = archive.extractfile(members[extension])
        return handle.read().decode("utf-8", errors="replace").strip() if handle else ""

    caption = text_of("txt") or text_of("caption")
    if not caption and "json" in members:
        try:
            row = json.loads(text_of("json"))
            caption = next((str(row[name]) for name in CAPTION_FIELDS if row.get(name)), "")
        except (json.JSONDecodeError, AttributeError):
            caption = ""
    return caption, text_of("tags")


def iter_parquet(path: Path) -> Iterator[SourceItem]:
    """Rows of a Parquet file with an ``image`` column (bytes, or the Hugging Face {'bytes', 'path'} struct)."""
    import pyarrow.parquet as pq  # imported here: reading folders must not need pyarrow loaded

    table = pq.read_table(path)
    if "image" not in table.column_names:
        raise ValueError(f"{path}: Parquet file has no 'image' column; columns are {table.column_names}")
    caption_column = next((name for name in CAPTION_FIELDS if name in table.column_names), None)
    images = table.column("image")
    for row in range(table.num_rows):
        cell = images[row].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        name = (cell.get("path") if isinstance(cell, dict) else None) or f"{row:08d}.png"
        key_value = table.column("key")[row].as_py() if "key" in table.column_names else f"{row:08d}"
        yield SourceItem(
            key=f"{path.stem}/{key_value}",
            file_name=PurePosixPath(str(name)).name,
            folder=path.stem,
            read_bytes=lambda data=data: data or b"",
            original_caption=str(table.column(caption_column)[row].as_py() or "") if caption_column else "",
            tags=str(table.column("tags")[row].as_py() or "") if "tags" in table.column_names else "",
        )


def check_inputs(inputs: list[str]) -> None:
    """Raise ``ValueError`` for an input that does not exist or is neither a folder, a .tar nor a .parquet file."""
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"input {raw!r} does not exist; give an image folder, a .tar shard or a .parquet file")
        if not path.is_dir() and path.suffix not in (".tar", ".parquet"):
            raise ValueError(f"input {raw!r} is not a folder, .tar or .parquet file")


def iter_inputs(inputs: list[str], *, sidecar_extension: str, exclude: Path | None = None) -> Iterator[SourceItem]:
    """All items of all inputs; raise ``ValueError`` for a path that does not exist or has an unknown type."""
    check_inputs(inputs)
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            yield from iter_folder(path, sidecar_extension=sidecar_extension, exclude=exclude)
        elif path.suffix == ".tar":
            yield from iter_webdataset(path)
        else:
            yield from iter_parquet(path)
