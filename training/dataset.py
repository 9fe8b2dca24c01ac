"""The dataset contract shared by recaption and training: which images a dataset holds, under which keys, and where
each caption comes from.

Formats (the same for both tools, so what Recaption writes trains unchanged):
- an image folder (recursive; `lens_core.image_io.IMAGE_EXTENSIONS`) with caption sidecars (`<stem>.txt`, or another
  extension such as `<stem>.lens.txt`) and/or `metadata.jsonl` rows `{"file_name": ..., "text": ...}` (the Hugging
  Face imagefolder convention; `file_name` is relative to the folder holding the jsonl);
- webdataset `.tar` shards (members `<key>.<image ext>` + `<key>.txt` / `.caption` / `.json`);
- Parquet files with an image column (bytes or the Hugging Face `{bytes, path}` struct) and a caption column.

A folder that holds several of them (images beside `.tar` or `.parquet` files) is read as one of them: the `format`
argument picks it, and `auto` picks images, then webdataset, then parquet, and says so in `Dataset.notes`.

The tools keep their own files (progress, reports, histograms, the manifest) in the `_lens/` subfolder, which every
reader skips, as it skips hidden files and folders. `_lens/dataset.json` (the manifest) records where Recaption wrote
its captions, so `caption_source="auto"` trains on them and not on the alt-text beside them.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lens_core.atomic_io import atomic_write_text
from lens_core.image_io import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

LENS_FOLDER = "_lens"
MANIFEST_NAME = "dataset.json"
DATASET_FORMATS = ("auto", "folder", "webdataset", "parquet")
TEXT_FIELDS = ("text", "caption", "alt_text", "alt", "prompt")  # caption fields and columns, in order of preference
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
# Files earlier Recaption versions wrote next to the images (before `_lens/` existed): never dataset content.
_LEGACY_ARTIFACT = re.compile(r"^recaption_histogram(-shard\d+of\d+)?\.png$")
_METADATA_FILE = re.compile(r"^metadata(-shard\d+of\d+)?\.jsonl$")


@dataclass
class DatasetItem:
    """One image of a dataset: a unique key, where its bytes are, and its caption from the chosen source."""

    key: str  # posix relative path without extension ("cats/001"), or "<shard stem>/<key>" for tars and parquet
    file_name: str  # "001.jpg"
    folder: str  # "cats" ('' at the top)
    read_bytes: Callable[[], bytes]
    source: str  # where a person finds it: a path, "shard.tar::key" or "file.parquet row 3"
    caption: str = ""  # '' when the chosen source has none for this image
    tags: str = ""
    path: Path | None = None  # the image file, for folders

    @property
    def extension(self) -> str:
        return PurePosixPath(self.file_name).suffix.lower()


@dataclass
class Dataset:
    """The items of a dataset in a stable order, the format and caption source used, and notes on those choices."""

    root: Path
    format: str
    caption_source: str
    items: list[DatasetItem]
    notes: list[str] = field(default_factory=list)


def is_tool_file(relative: Path) -> bool:
    """Whether a path inside a dataset folder belongs to the tools (or is hidden), not to the dataset."""
    parts = relative.parts
    return any(part.startswith(".") or part == LENS_FOLDER for part in parts) or bool(
        _LEGACY_ARTIFACT.match(relative.name)
    )


def lens_folder(dataset_folder: str | Path) -> Path:
    """`<folder>/_lens`: where the tools keep their own files inside a dataset."""
    return Path(dataset_folder) / LENS_FOLDER


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """What Recaption recorded about a folder it wrote (`_lens/dataset.json`), or None."""
    path = lens_folder(folder) / MANIFEST_NAME
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_manifest(folder: str | Path, caption_source: str, **details: Any) -> None:
    """Record (atomically) where the captions of `folder` are, for readers using `caption_source="auto"`."""
    text = json.dumps({"caption_source": caption_source, **details}, indent=2, ensure_ascii=False)
    atomic_write_text(lens_folder(folder) / MANIFEST_NAME, text + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------------------


def _folder_images(root: Path, exclude: Path | None) -> list[Path]:
    images = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or is_tool_file(path.relative_to(root)):
            continue
        if exclude is not None and exclude != root and path.is_relative_to(exclude):
            continue
        if path.is_file():
            images.append(path)
    return images


def _metadata_rows(root: Path, notes: list[str]) -> dict[Path, dict[str, Any]]:
    """Resolved image path -> its metadata.jsonl row, from every metadata file under `root`."""
    rows: dict[Path, dict[str, Any]] = {}
    files = [p for p in sorted(root.rglob("*.jsonl")) if _METADATA_FILE.match(p.name)]
    outside = 0
    for metadata in (p for p in files if not is_tool_file(p.relative_to(root))):
        for number, line in enumerate(metadata.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = (metadata.parent / row["file_name"]).resolve()
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{metadata} line {number} is not a JSON object with a 'file_name' ({error}); fix or remove it."
                ) from None
            if not image.is_relative_to(root.resolve()):
                outside += 1
                continue
            rows[image] = row
    if outside:
        notes.append(f"{outside} metadata.jsonl rows name images outside {root} and were ignored")
    return rows


def _row_text(row: dict[str, Any], name: str | None) -> str:
    names = (name,) if name else TEXT_FIELDS
    return next((str(row[n]).strip() for n in names if row.get(n) not in (None, "")), "")


def _sidecar(path: Path, extension: str) -> str:
    try:
        return path.with_suffix(extension).read_text(encoding="utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return ""


def _resolve_folder_source(root: Path, requested: str, use_manifest: bool, has_rows: bool, notes: list[str]) -> str:
    if requested != "auto":
        return requested
    manifest = read_manifest(root) if use_manifest else None
    if manifest and isinstance(manifest.get("caption_source"), str):
        notes.append(
            f"captions from {manifest['caption_source']} (recorded by Recaption in {LENS_FOLDER}/dataset.json)"
        )
        return manifest["caption_source"]
    source = "metadata.jsonl" if has_rows else ".txt"
    notes.append(f"captions from {source}" + (" sidecars" if source == ".txt" else ""))
    return source


def _read_folder(root: Path, caption_source: str, use_manifest: bool, exclude: Path | None) -> Dataset:
    notes: list[str] = []
    rows = _metadata_rows(root, notes)
    source = _resolve_folder_source(root, caption_source, use_manifest, bool(rows), notes)
    items = []
    for path in _folder_images(root, exclude):
        relative = path.relative_to(root)
        row = rows.get(path.resolve(), {})
        if source.startswith("."):
            caption = _sidecar(path, source)
        else:
            caption = _row_text(row, source.removeprefix("column:") if source.startswith("column:") else None)
        tags = row.get("tags", "")
        items.append(
            DatasetItem(
                key=relative.with_suffix("").as_posix(),
                file_name=path.name,
                folder=relative.parent.as_posix() if relative.parent != Path(".") else "",
                read_bytes=path.read_bytes,
                source=str(path),
                caption=caption,
                tags=", ".join(map(str, tags)) if isinstance(tags, list) else str(tags),
                path=path,
            )
        )
    return Dataset(root, "folder", source, items, notes)


# ---------------------------------------------------------------------------------------------------------------------
# Webdataset and Parquet
# ---------------------------------------------------------------------------------------------------------------------


def _tar_member_reader(tar_path: Path, offset: int, size: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with tar_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    return read


def _tar_caption(archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo], source: str) -> tuple[str, str]:
    def text_of(extension: str) -> str:
        handle = archive.extractfile(members[extension]) if extension in members else None
        return handle.read().decode("utf-8", errors="replace").strip() if handle else ""

    if source.startswith("."):
        caption = text_of(source[1:])
    else:
        caption = ""
        if source == "auto":
            caption = text_of("txt") or text_of("caption")
        if not caption and "json" in members:
            try:
                row = json.loads(text_of("json"))
                caption = _row_text(row, source.removeprefix("column:") if source.startswith("column:") else None)
            except (json.JSONDecodeError, AttributeError):
                caption = ""
    return caption, text_of("tags")


def _read_tar(tar_path: Path, source: str) -> list[DatasetItem]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(tar_path) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")  # webdataset keys end at the first dot of the name
                samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = member
            texts = {key: _tar_caption(archive, members, source) for key, members in samples.items()}
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"{tar_path} is not a readable tar archive: {error}") from None
    items = []
    for key in sorted(samples):
        members = samples[key]
        image_ext = next((ext for ext in members if "." + ext in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            continue
        member = members[image_ext]
        items.append(
            DatasetItem(
                key=f"{tar_path.stem}/{key}",
                file_name=f"{PurePosixPath(key).name}.{image_ext}",
                folder=tar_path.stem,
                read_bytes=_tar_member_reader(tar_path, member.offset_data, member.size),
                source=f"{tar_path}::{key}",
                caption=texts[key][0],
                tags=texts[key][1],
            )
        )
    return items


def _read_parquet(path: Path, source: str) -> list[DatasetItem]:
    import pyarrow.parquet as pq  # imported here: reading folders must not need pyarrow loaded

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 (pyarrow raises several unrelated types for a damaged file)
        raise ValueError(f"{path} is not a readable Parquet file: {error}") from None
    columns = table.column_names
    image_column = next((name for name in IMAGE_COLUMNS if name in columns), None)
    if image_column is None:
        raise ValueError(f"{path}: no image column (one of {', '.join(IMAGE_COLUMNS)}); the columns are {columns}.")
    if source.startswith("."):
        raise ValueError(f"caption_source {source!r} names sidecar files; {path} is Parquet: use column:NAME or auto.")
    wanted = source.removeprefix("column:") if source.startswith("column:") else None
    caption_column = wanted if wanted else next((name for name in TEXT_FIELDS if name in columns), None)
    if caption_column is not None and caption_column not in columns:
        raise ValueError(f"{path} has no column {caption_column!r} (caption_source {source!r}); it has {columns}.")
    keys = table.column("key").to_pylist() if "key" in columns else None
    captions = table.column(caption_column).to_pylist() if caption_column else [None] * table.num_rows
    tags = table.column("tags").to_pylist() if "tags" in columns else [None] * table.num_rows
    items = []
    for row, cell in enumerate(table.column(image_column).to_pylist()):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        name = (cell.get("path") if isinstance(cell, dict) else None) or f"{row:08d}.png"
        items.append(
            DatasetItem(
                key=f"{path.stem}/{keys[row] if keys else f'{row:08d}'}",
                file_name=PurePosixPath(str(name)).name,
                folder=path.stem,
                read_bytes=lambda data=data: data or b"",
                source=f"{path} row {row}",
                caption=str(captions[row] or "").strip(),
                tags=str(tags[row] or ""),
            )
        )
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def formats_in(folder: Path, exclude: Path | None = None) -> dict[str, list[Path]]:
    """The dataset formats a folder holds: 'folder' (image files), 'webdataset' (.tar), 'parquet' (top level)."""
    found = {
        "folder": _folder_images(folder, exclude)[:1],
        "webdataset": sorted(folder.glob("*.tar")),
        "parquet": sorted(folder.glob("*.parquet")),
    }
    return {name: paths for name, paths in found.items() if paths}


def read_dataset(
    path: str | Path,
    *,
    format: str = "auto",  # noqa: A002 (the config key's name)
    caption_source: str = "auto",
    use_manifest: bool = True,
    exclude: str | Path | None = None,
) -> Dataset:
    """Every image of the dataset at `path` (folder, .tar or .parquet) with its caption from `caption_source`.

    `use_manifest=False` ignores `_lens/dataset.json` (Recaption reads the alt-text, not its own earlier output);
    `exclude` skips a subfolder (Recaption's output folder inside its input). Raises ValueError for a path that is not
    a dataset or a format it does not hold."""
    path = Path(path)
    if format not in DATASET_FORMATS:
        raise ValueError(f"format must be one of {', '.join(DATASET_FORMATS)}, got {format!r}.")
    if not path.exists():
        raise ValueError(f"Dataset {path} does not exist; give an image folder, a webdataset .tar or a .parquet file.")
    if path.is_file():
        kind = {".tar": "webdataset", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"{path} is not a dataset: give an image folder, a webdataset .tar or a .parquet file.")
        files, notes = [path], []
    else:
        found = formats_in(path, Path(exclude) if exclude else None)
        if format != "auto" and format not in found:
            raise ValueError(f"{path} holds no {format} dataset; it holds: {', '.join(found) or 'nothing readable'}.")
        kind = format if format != "auto" else next((name for name in found), "folder")
        notes = []
        if format == "auto" and len(found) > 1:
            notes.append(
                f"{path} holds the dataset in several formats ({', '.join(found)}); reading {kind} "
                f"(choose another with format / data.format)"
            )
        if kind == "folder":
            dataset = _read_folder(path, caption_source, use_manifest, Path(exclude) if exclude else None)
            dataset.notes[:0] = notes
            return dataset
        files = found[kind]
    source = caption_source
    if kind == "webdataset":
        items = [item for file in files for item in _read_tar(file, source)]
    else:
        items = [item for file in files for item in _read_parquet(file, source)]
    notes.append(f"{kind}: {len(files)} file(s), captions from {source}")
    return Dataset(path, kind, source, items, notes)
