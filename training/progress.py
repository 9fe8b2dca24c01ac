"""Progress as JSON lines: the one format and reader of every long job (recaption and training).

Each line is one JSON object with at least ``event`` (the kind) and ``time`` (Unix seconds); a job adds its own fields
(recaption: ``done``, ``total`` and per-image records; training: ``step``, ``loss``, ...). Lines are written whole and
flushed one by one, so a reader never sees half an event, and a line cut short by a kill is skipped when read back.
Every value passes the secret scrubber before it is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lens_core.atomic_io import atomic_write_text

from .secret_scrubber import scrub_value

PROGRESS_FILE = "progress.jsonl"


class ProgressLog:
    """Appends events to one progress file (one process writes one file), one flushed line each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = self.path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns the record as written (scrubbed)."""
        record = scrub_value({"event": event, "time": round(time.time(), 3), **fields})
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()
        return record

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of one progress file, oldest first (a torn last line from a killed job is skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def read_progress(output_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a training run folder (`<output_dir>/progress.jsonl`)."""
    return read_events(Path(output_dir) / PROGRESS_FILE)


def truncate_after(path: str | Path, step: int) -> None:
    """Drop the events of steps after `step` (a resumed run redoes them), atomically."""
    path = Path(path)
    if path.is_file():
        kept = [event for event in read_events(path) if event.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(event, ensure_ascii=False) + "\n" for event in kept))
