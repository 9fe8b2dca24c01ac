"""Where a recaption run keeps its journal, and reading it back (the format and reader are `training.progress`).

Each event has ``event`` ('start', 'item', 'stopped', 'end'), ``done`` and ``total``; 'item' events carry the
per-image result. The files live in the output folder's ``_lens/`` subfolder, which dataset readers skip. A single
process writes ``_lens/progress.jsonl``; shard i of n writes ``_lens/progress-shard<i>of<n>.jsonl`` so processes never
interleave lines. The latest 'item' record of an image is its state: a resumed run skips the ``ok`` ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lens_core.atomic_io import atomic_write_text

from ..dataset import lens_folder
from ..progress import read_events


def shard_suffix(index: int, count: int) -> str:
    """'' for a single process, '-shard<i>of<n>' for shard i of n."""
    return "" if count == 1 else f"-shard{index}of{count}"


def progress_path(output_dir: Path, shard_index: int, shard_count: int) -> Path:
    """The progress file of one shard."""
    return lens_folder(output_dir) / f"progress{shard_suffix(shard_index, shard_count)}.jsonl"


def report_path(output_dir: Path, shard_index: int = 0, shard_count: int = 1) -> Path:
    """The JSON report of one shard (its histogram is beside it, named in the report)."""
    return lens_folder(output_dir) / f"recaption_report{shard_suffix(shard_index, shard_count)}.json"


def latest_items(output_dir: Path) -> dict[str, dict[str, Any]]:
    """key -> the latest 'item' record over every progress file of ``output_dir`` (all shards, all runs)."""
    latest: dict[str, dict[str, Any]] = {}
    # Journals of earlier versions sit next to the images (before _lens/ existed): read them too, oldest first.
    found = [*Path(output_dir).glob("progress*.jsonl"), *lens_folder(output_dir).glob("progress*.jsonl")]
    paths = sorted(found, key=lambda path: path.stat().st_mtime)
    for path in paths:
        for event in read_events(path):
            if event.get("event") == "item" and isinstance(event.get("key"), str):
                latest[event["key"]] = event
    return latest


def original_captions(output_dir: Path) -> dict[str, str]:
    """key -> the caption an image had before its first recaption (every shard's snapshot)."""
    found: dict[str, str] = {}
    for path in sorted(lens_folder(output_dir).glob("original_captions*.json")):
        try:
            found.update(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            continue
    return found


def save_original_captions(output_dir: Path, shard_index: int, shard_count: int, captions: dict[str, str]) -> None:
    """Write this shard's snapshot of the original captions atomically (before any of them can be overwritten)."""
    name = f"original_captions{shard_suffix(shard_index, shard_count)}.json"
    atomic_write_text(lens_folder(output_dir) / name, json.dumps(captions, ensure_ascii=False, indent=0) + "\n")
