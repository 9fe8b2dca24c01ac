"""Dataset uploads with limits: a zip or loose images become a folder in the caller's workspace, or nothing.

A zip is checked from its directory before anything is written (member count, names, total unpacked size,
compression ratio, free disk space), then each member is streamed (never read whole) into a hidden temporary folder
that is renamed into place only when every member arrived intact; a refused upload leaves nothing behind. Gradio's
own temporary copy of the upload is removed afterwards. No Gradio import here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import stat
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lens_core.image_io import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # what the image module (and so recaption and training) reads
CAPTION_SUFFIXES = (".txt",)
METADATA_NAME = "metadata.jsonl"  # the Hugging Face imagefolder captions: the only .jsonl a dataset needs
IGNORED_PARTS = ("__MACOSX", ".DS_Store", "Thumbs.db")  # what zip tools add; skipped without a word
CHUNK_BYTES = 1024 * 1024
SMALL_MEMBER_BYTES = 1024 * 1024  # below this a high compression ratio is harmless (text compresses well)


class UploadError(ValueError):
    """An upload that is refused; the message names the problem and the limit."""


@dataclass(frozen=True)
class UploadLimits:
    """Caps on one upload. The defaults suit a shared server; `--upload-limit-gb` sets `max_total_bytes`."""

    max_total_bytes: int = 2 * 1024**3  # unpacked
    max_members: int = 20_000
    max_ratio: float = 100.0  # unpacked / packed, per large member and overall: refuses zip bombs
    max_name_chars: int = 512  # a whole member path
    max_part_chars: int = 255  # one folder or file name
    min_free_bytes: int = 1024**3  # disk space left free after unpacking
    room_bytes: int | None = None  # what the caller's workspace has left under its quota (None: no quota)

    def most_bytes(self) -> int:
        """The most one upload may unpack to now: the per-upload cap, or the workspace's room if smaller."""
        return self.max_total_bytes if self.room_bytes is None else min(self.max_total_bytes, self.room_bytes)

    def check_total(self, total: int, what: str) -> None:
        """UploadError when `what` (which unpacks to `total` bytes) is over the upload cap or the workspace's room."""
        if total > self.max_total_bytes:
            raise UploadError(f"{what} {_gib(total)}; the limit is {_gib(self.max_total_bytes)}.")
        if self.room_bytes is not None and total > self.room_bytes:
            raise UploadError(
                f"{what} {_gib(total)}, but your workspace has only {_gib(max(self.room_bytes, 0))} left: delete "
                "datasets (Recaption tab) or images (Gallery) first."
            )


@dataclass
class UploadResult:
    """A dataset folder that was written, and what was left out of it."""

    folder: Path
    files: int
    total_bytes: int
    skipped: list[str] = field(default_factory=list)  # names not part of a dataset (not images or captions)

    def summary(self) -> str:
        text = f"{self.files} file(s), {self.total_bytes / 1024**2:.1f} MiB"
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            text += f"; skipped {len(self.skipped)} file(s) that are not images or captions ({shown})"
        return text


def is_dataset_file(name: str) -> bool:
    """Images, caption sidecars and metadata.jsonl: what the recaption and training readers use."""
    lower = PurePosixPath(name).name.lower()
    return lower.endswith(IMAGE_SUFFIXES + CAPTION_SUFFIXES) or lower == METADATA_NAME


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB"


def check_member_name(name: str, limits: UploadLimits) -> PurePosixPath:
    """The member's relative path, or UploadError for names that could leave the folder or are unreasonable."""
    if len(name) > limits.max_name_chars:
        raise UploadError(f"The zip holds a path of {len(name)} characters; the limit is {limits.max_name_chars}.")
    if re.search(r"[\x00-\x1f\x7f\\]", name):
        raise UploadError(f"The zip holds an unsafe path {name!r} (control characters or backslashes).")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise UploadError(f"The zip holds an unsafe path {name!r}: members must stay inside the dataset folder.")
    too_long = [part for part in path.parts if len(part) > limits.max_part_chars]
    if too_long:
        raise UploadError(
            f"The zip holds a name of {len(too_long[0])} characters; the limit is {limits.max_part_chars}."
        )
    return path


def _plan_zip(archive: zipfile.ZipFile, limits: UploadLimits, destination_parent: Path) -> tuple[list, list[str]]:
    """Which members to unpack (checked from the zip's directory only) and which names are skipped."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise UploadError(f"The zip holds {len(infos)} entries; the limit is {limits.max_members}.")
    members, skipped = [], []
    for info in infos:
        path = check_member_name(info.filename, limits)
        if info.is_dir():
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadError(f"The zip holds a symbolic link {info.filename!r}; links are not allowed.")
        if info.flag_bits & 0x1:
            raise UploadError(f"The zip member {info.filename!r} is encrypted; upload an unencrypted zip.")
        if any(part in IGNORED_PARTS or part.startswith("._") for part in path.parts):
            continue
        if not is_dataset_file(info.filename) or any(part.startswith(".") for part in path.parts):
            skipped.append(info.filename)
            continue
        if info.file_size > SMALL_MEMBER_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise UploadError(
                f"The zip member {info.filename!r} unpacks {info.file_size / max(info.compress_size, 1):.0f} times "
                f"larger than it is packed; the limit is {limits.max_ratio:.0f} (a zip bomb?)."
            )
        members.append(info)
    total = sum(info.file_size for info in members)
    packed = sum(info.compress_size for info in members)
    limits.check_total(total, "The zip unpacks to")
    if total > SMALL_MEMBER_BYTES and total > limits.max_ratio * max(packed, 1):
        raise UploadError(
            f"The zip unpacks {total / max(packed, 1):.0f} times larger than it is packed; the limit is "
            f"{limits.max_ratio:.0f} (a zip bomb?)."
        )
    _check_free_space(destination_parent, total, limits)
    return members, skipped


def _check_free_space(folder: Path, needed: int, limits: UploadLimits) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free - needed < limits.min_free_bytes:
        raise UploadError(
            f"The server has {_gib(free)} free; unpacking {_gib(needed)} would leave less than "
            f"{_gib(limits.min_free_bytes)}. Try a smaller upload."
        )


def _stream_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> int:
    """Copy one member in chunks; a member that unpacks to more than its directory entry says is refused."""
    written = 0
    with archive.open(info) as source, target.open("xb") as sink:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > info.file_size:
                raise UploadError(f"The zip member {info.filename!r} holds more than its declared size.")
            sink.write(chunk)
    return written


def _staging_folder(destination: Path) -> Path:
    if destination.exists():
        raise UploadError(f"{destination.name} already exists; choose another name.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".partial-{destination.name}-", dir=destination.parent))


def extract_dataset_zip(zip_path: str | Path, destination: Path, limits: UploadLimits | None = None) -> UploadResult:
    """Unpack the dataset files of `zip_path` into the new folder `destination`, all or nothing."""
    limits = limits or UploadLimits()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise UploadError("That file is not a valid .zip archive.") from None
    with archive:
        members, skipped = _plan_zip(archive, limits, destination.parent)
        if not members:
            raise UploadError(
                f"The zip holds no images; allowed files: {', '.join(IMAGE_SUFFIXES + CAPTION_SUFFIXES)} "
                f"and {METADATA_NAME}."
            )
        staging = _staging_folder(destination)
        try:
            total = 0
            root = staging.resolve()
            for info in members:
                target = (staging / info.filename).resolve()
                if not target.is_relative_to(root):  # check_member_name already refused this; kept as a guard
                    raise UploadError(f"The zip holds an unsafe path {info.filename!r}.")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    total += _stream_member(archive, info, target)
                except FileExistsError:
                    raise UploadError(f"The zip holds {info.filename!r} twice.") from None
                if total > limits.most_bytes():  # the directory understated a member's size
                    raise UploadError(f"The zip unpacks to more than {_gib(limits.most_bytes())}.")
            staging.rename(destination)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise UploadError(f"The zip is damaged and was not unpacked: {error}") from None
        except OSError as error:  # the message would name server folders: only the reason is shown
            shutil.rmtree(staging, ignore_errors=True)
            raise UploadError(f"The zip could not be unpacked: {error.strerror or type(error).__name__}.") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return UploadResult(destination, len(members), total, skipped)


def _clean_file_name(name: str) -> str:
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:120] or "image"
    return f"{stem}{suffix}"


def save_dataset_files(paths: list[str | Path], destination: Path, limits: UploadLimits | None = None) -> UploadResult:
    """Copy uploaded images (and captions) into the new folder `destination`, all or nothing."""
    limits = limits or UploadLimits()
    files = [Path(path) for path in paths]
    if len(files) > limits.max_members:
        raise UploadError(f"{len(files)} files were uploaded; the limit is {limits.max_members}.")
    kept = [path for path in files if is_dataset_file(path.name)]
    skipped = [path.name for path in files if not is_dataset_file(path.name)]
    if not kept:
        raise UploadError(f"No images among the uploaded files; allowed: {', '.join(IMAGE_SUFFIXES)}.")
    total = sum(path.stat().st_size for path in kept)
    limits.check_total(total, "The files hold")
    _check_free_space(destination.parent, total, limits)
    staging = _staging_folder(destination)
    try:
        for path in kept:
            name = _clean_file_name(path.name)
            target, counter = staging / name, 1
            while target.exists():
                counter += 1
                target = staging / f"{Path(name).stem}-{counter}{Path(name).suffix}"
            shutil.copyfile(path, target)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return UploadResult(destination, len(kept), total, skipped)


def list_datasets(uploads: Path) -> dict[str, Path]:
    """The uploaded datasets under `uploads` by name (its visible folders, newest first; half-done uploads are
    hidden `.partial-*` folders and never listed)."""
    if not uploads.is_dir():
        return {}
    folders = [path for path in uploads.iterdir() if path.is_dir() and not path.name.startswith(".")]
    return {path.name: path for path in sorted(folders, key=lambda path: path.stat().st_mtime, reverse=True)}


def find_dataset(uploads: Path, name) -> Path:
    """The folder of the uploaded dataset `name`: one of `list_datasets(uploads)` and nothing else, whatever the
    client sent; UploadError naming the choices otherwise."""
    datasets = list_datasets(uploads)
    if not isinstance(name, str) or name not in datasets:
        choices = ", ".join(datasets) or "none yet: upload a zip"
        raise UploadError(f"Pick one of your uploaded datasets ({choices}); {name!r} is not one of your datasets.")
    return datasets[name]


def delete_dataset(uploads: Path, name, inside: Callable[[Path], Path]) -> None:
    """Delete the uploaded dataset `name` (`find_dataset`); `inside` resolves the folder and refuses one outside the
    caller's workspace (`Workspace.resolve`)."""
    folder = inside(find_dataset(uploads, name))
    if folder.parent != Path(inside(uploads)) or folder.is_symlink():
        raise UploadError(f"{name!r} is not one of your datasets.")
    shutil.rmtree(folder)


def new_upload_folder(uploads: Path) -> Path:
    """A fresh, unused folder name under `uploads` (the folder itself is created by the extraction)."""
    return uploads / f"upload-{uuid.uuid4().hex[:8]}"


def discard_temporary_upload(path: str | Path | None, cache_dir: str | Path) -> None:
    """Delete Gradio's temporary copy of an upload (and its now empty hash folder). Only files inside `cache_dir`
    are touched: a path from anywhere else is left alone."""
    if not path:
        return
    cache = Path(cache_dir).resolve()
    file = Path(path).resolve()
    if not file.is_relative_to(cache) or file == cache:
        return
    file.unlink(missing_ok=True)
    parent = file.parent
    if parent != cache and parent.is_relative_to(cache):
        with contextlib.suppress(OSError):  # not empty: another file of the same upload
            parent.rmdir()
