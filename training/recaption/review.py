"""Review: list the captions of a run, and save a person's edit or acceptance atomically.

An edit is recorded as a new 'item' line in ``_lens/progress.jsonl`` (marked ``edited`` / ``accepted``), so the
journal stays the single source of truth: a later resume keeps the edit and rebuilds metadata.jsonl / webdataset /
Parquet outputs from it. The sidecar is rewritten first (atomically) when the run writes sidecars, then the record,
as the runner does: a record never claims a caption that is not on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lens_core.atomic_io import atomic_write_text

from ..progress import ProgressLog
from .config import LENS_TEXT_TOKEN_LIMIT
from .progress import latest_items, progress_path
from .quality import TokenCounter, assess
from .writers import sidecar_path


def captioned_records(output_dir: Path, *, flagged_only: bool = False) -> list[dict[str, Any]]:
    """Latest ok records of ``output_dir``, sorted by key; optionally only those with quality flags."""
    records = [record for record in latest_items(output_dir).values() if record.get("status") == "ok"]
    if flagged_only:
        records = [record for record in records if record.get("flags")]
    return sorted(records, key=lambda record: record["key"])


def save_caption(
    output_dir: Path,
    key: str,
    caption: str,
    *,
    accepted: bool = True,
    write_sidecar: bool = True,
    sidecar_extension: str = ".txt",
    target_words: int = 100,
    counter: TokenCounter | None = None,
) -> dict[str, Any]:
    """Record an edited caption for ``key`` and rewrite its sidecar; raise ``ValueError`` for an unknown key or empty text."""
    caption = caption.strip()
    if not caption:
        raise ValueError(f"the caption for {key!r} is empty; write a caption or leave it unchanged")
    latest = latest_items(output_dir)
    if key not in latest or latest[key].get("status") != "ok":
        raise ValueError(f"{key!r} has no caption in {output_dir}; choose one of the captioned images")
    record = dict(latest[key])
    quality = assess(
        caption,
        original=record.get("original_caption", ""),
        target_words=target_words,
        token_limit=LENS_TEXT_TOKEN_LIMIT,
        counter=counter or TokenCounter(),
    )
    record.update(
        caption=caption,
        words=quality.words,
        tokens=quality.tokens,
        flags=quality.flags,
        edited=caption != latest[key].get("caption"),
        accepted=accepted,
    )
    record.pop("event", None)
    record.pop("time", None)
    if write_sidecar:
        atomic_write_text(sidecar_path(output_dir, key, sidecar_extension), caption + "\n")
    with ProgressLog(progress_path(output_dir, 0, 1)) as log:
        log.write("item", **record)
    return record
