"""Atomic file writes: a temp file in the same folder, renamed over the target only once it is complete.

A reader (or a run resumed after a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


@functools.cache
def process_umask() -> int:
    """The process's umask, read without changing it where the OS allows (changing it races with other threads)."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_build(path: str | Path, build: Callable[[Path], None], mode: int | None = None) -> Path:
    """Run `build(temp_path)` to write the file, then rename it over `path`; the temp file is removed on failure.

    The file gets `mode`, by default what `open()` would give a new file (0666 less the umask, usually 0644): the
    temp file's private 0600 must not outlive the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(handle, 0o666 & ~process_umask() if mode is None else mode)
    os.close(handle)
    try:
        build(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, flushed to disk before the rename."""

    def write(temporary: Path) -> None:
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())

    return atomic_build(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))
