"""Progress as JSON lines: the record the UI tails and the journal a resumed run reads back.

Each line is one JSON object with at least ``event`` ('start', 'item', 'stopped', 'end'), ``done`` and ``total``;
'item' lines also carry the per-image result. A single process writes ``progress.jsonl``; shard i of n writes
``progress-shard<i>of<n>.jsonl`` so processes never interleave lines. A line cut short by a kill is ignored on read.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def progress_path(output_dir: Path, shard_index: int, shard_count: int) -> Path:
    """The progress file of one shard."""
    if shard_count == 1:
        return output_dir / "progress.jsonl"
    return output_dir / f"progress-shard{shard_index}of{shard_count}.jsonl"


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines of one progress file (a torn last line from a killed run is skipped)."""
    events = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def latest_items(output_dir: Path) -> dict[str, dict[str, Any]]:
    """key -> the latest 'item' record over every progress file in ``output_dir`` (all shards, all runs)."""
    latest: dict[str, dict[str, Any]] = {}
    paths = sorted(output_dir.glob("progress*.jsonl"), key=lambda path: path.stat().st_mtime)
    for path in paths:
        for event in read_events(path):
            if event.get("event") == "item" and isinstance(event.get("key"), str):
                latest[event["key"]] = event
    return latest


class ProgressLog:
    """Appends events to this shard's progress file, one flushed line each (the OS keeps it if we are killed)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._stream = path.open("a", encoding="utf-8")

    def write(self, event: str, **values: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **values}
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()
        return record

    def close(self) -> None:
        self._stream.close()
