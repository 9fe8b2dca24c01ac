"""The recaption run: list the shard's images, skip finished ones, caption the rest, write results, report.

Exactly once, also in place: before any caption can overwrite an alt-text sidecar, the original captions are saved
(atomically) to ``_lens/original_captions.json``; then, per image, the image is placed (separate output folder), the
caption file is written atomically, and only then the progress record says ``ok``. A kill at any point leaves either
no record (the image is captioned again, from the saved alt-text) or a record whose caption file is on disk; a failed
write marks the image failed with the path and the reason. Failed images are retried by the next run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_core.atomic_io import atomic_write_text
from lens_core.image_io import load_image

from ..dataset import DatasetItem, lens_folder, read_dataset, write_manifest
from ..progress import ProgressLog
from .backends import BackendUnavailableError, CaptionBackend, CaptionJob, CaptionOutcome, build_backend
from .config import LENS_TEXT_TOKEN_LIMIT, RecaptionConfig
from .progress import (
    latest_items,
    original_captions,
    progress_path,
    report_path,
    save_original_captions,
    shard_suffix,
)
from .quality import TokenCounter, assess, default_counter
from .report import build_report, write_report
from .templates import PromptTemplate
from .writers import image_name, place_image, sidecar_path, write_metadata_jsonl, write_parquet, write_webdataset

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is 0 when every image of the shard has a caption, 1 otherwise."""

    output_dir: Path
    total: int
    captioned: int
    failed: int
    pending: int
    skipped: int
    stopped_reason: str | None = None
    report_path: Path | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.stopped_reason is None else 1


def resolve_output_dir(config: RecaptionConfig) -> Path:
    """``output_dir`` or, for a single folder input, the folder itself (sidecars next to the images)."""
    if config.output_dir:
        return Path(config.output_dir)
    if len(config.inputs) == 1 and Path(config.inputs[0]).is_dir():
        return Path(config.inputs[0])
    raise ValueError(f"output_dir is required when the inputs are not one image folder (inputs: {config.inputs})")


def check_inputs(inputs: list[str]) -> None:
    """Raise ``ValueError`` for an input that does not exist or is neither a folder, a .tar nor a .parquet file."""
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"input {raw!r} does not exist; give an image folder, a .tar shard or a .parquet file")
        if not path.is_dir() and path.suffix not in (".tar", ".parquet"):
            raise ValueError(f"input {raw!r} is not a folder, .tar or .parquet file")


class RecaptionRunner:
    """Runs one config end to end. ``backend`` may be injected (tests); by default it is built from the config."""

    def __init__(self, config: RecaptionConfig, backend: CaptionBackend | None = None) -> None:
        self.config = config.validate()
        self.template = PromptTemplate.resolve(config.template, config.prompt, config.target_words)
        check_inputs(config.inputs)
        self.output_dir = resolve_output_dir(config)
        self.shard_index, self.shard_count = config.shard_position()
        self.counter: TokenCounter = default_counter(config.tokenizer)
        self._backend = backend
        # In place, images stay where they are; a separate folder receives them so it is a dataset of its own.
        in_place = len(config.inputs) == 1 and Path(config.inputs[0]).resolve() == self.output_dir.resolve()
        self.places_images = not in_place and bool({"sidecar", "jsonl"} & set(config.formats))

    # ------------------------------------------------------------------ selection
    def list_items(self) -> list[DatasetItem]:
        """This shard's images (round-robin over the sorted list, so shards never overlap)."""
        items = []
        for raw in self.config.inputs:
            # The alt-text is the hint: never read this tool's own earlier output (the manifest) as the original.
            dataset = read_dataset(
                raw, caption_source=self.config.caption_source, use_manifest=False, exclude=self.output_dir
            )
            for note in dataset.notes:
                logger.info("%s", note)
            items += dataset.items
        if not items:
            raise ValueError(
                f"no images found in {self.config.inputs}; image files must end in .png .jpg .jpeg .webp .bmp .gif "
                ".tif or .tiff"
            )
        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            duplicates = sorted({key for key in keys if keys.count(key) > 1})[:5]
            raise ValueError(f"several images share the key(s) {duplicates}; give inputs whose relative paths differ")
        return items[self.shard_index :: self.shard_count]

    def _is_finished(self, item: DatasetItem, record: dict[str, Any] | None) -> bool:
        if not record or record.get("status") != "ok":
            return False
        if "sidecar" in self.config.formats:
            return sidecar_path(self.output_dir, item.key, self.config.sidecar_extension).exists()
        return True

    def _keep_originals(self, items: list[DatasetItem], previous: dict[str, dict]) -> None:
        """Give every item the caption it had before its first recaption, saved before anything is overwritten."""
        saved = original_captions(self.output_dir)
        for item in items:
            if item.key in saved:
                item.caption = saved[item.key]
            elif "original_caption" in previous.get(item.key, {}):  # a journal from before the snapshot existed
                item.caption = previous[item.key]["original_caption"]
        snapshot = {**saved, **{item.key: item.caption for item in items}}
        if snapshot != saved:
            save_original_captions(self.output_dir, self.shard_index, self.shard_count, snapshot)

    # ------------------------------------------------------------------ one image
    def _job(self, item: DatasetItem) -> CaptionJob:
        prompt = self.template.render(
            original_caption=item.caption, tags=item.tags, file_name=item.file_name, folder=item.folder
        )
        job = CaptionJob(key=item.key, prompt=prompt, load_image=lambda: self._load(item, job), payload=item)
        return job

    def _load(self, item: DatasetItem, job: CaptionJob):
        """Read and decode one image (in the backend's worker); unreadable files become ``BadImageError``."""
        loaded = load_image(
            item.read_bytes,
            name=item.source,
            max_pixels=self.config.max_image_pixels,
            max_side=self.config.max_image_side,
        )
        job.notes.extend(loaded.notes)
        return loaded.image

    def _record(self, outcome: CaptionOutcome) -> dict[str, Any]:
        item: DatasetItem = outcome.job.payload
        record: dict[str, Any] = {
            "key": item.key,
            "file_name": item.file_name,
            "original_caption": item.caption,
            "image": str(item.path.resolve()) if item.path else None,
            "notes": outcome.job.notes,
            "attempts": outcome.attempts,
            "seconds": round(outcome.seconds, 3),
        }
        if outcome.caption is None:
            return {**record, "status": "failed", "reason": outcome.error}
        quality = assess(
            outcome.caption,
            original=item.caption,
            target_words=self.template.target_words,
            token_limit=LENS_TEXT_TOKEN_LIMIT,
            counter=self.counter,
        )
        record.update(caption=outcome.caption, words=quality.words, tokens=quality.tokens, flags=quality.flags)
        if "refusal" in quality.flags:  # a refusal is not a caption: never train on it, retry it next run
            return {**record, "status": "failed", "reason": f"the model refused: {outcome.caption[:120]!r}"}
        return {**record, "status": "ok"}

    def _write_results(self, item: DatasetItem, record: dict[str, Any]) -> dict[str, Any]:
        """Place the image and write the caption file (both atomic) before the record may say ok."""
        if record["status"] != "ok":
            return record
        target = None
        try:
            if self.places_images:
                target = self.output_dir / image_name(item)
                place_image(item, self.output_dir)
            if "sidecar" in self.config.formats:
                target = sidecar_path(self.output_dir, item.key, self.config.sidecar_extension)
                atomic_write_text(target, record["caption"] + "\n")
        except OSError as error:
            reason = f"could not write {target}: {error.strerror or error}"
            return {**record, "status": "failed", "reason": reason}
        return record

    # ------------------------------------------------------------------ the run
    def run(self) -> RunSummary:
        """Caption every unfinished image of this shard; always writes the report, even after a stop."""
        items = self.list_items()
        previous = latest_items(self.output_dir) if self.output_dir.exists() else {}
        self._keep_originals(items, previous)
        self._write_manifest()
        todo = [item for item in items if self.config.overwrite or not self._is_finished(item, previous.get(item.key))]
        if self.config.limit is not None:
            todo = todo[: self.config.limit]
        latest = {item.key: previous[item.key] for item in items if item.key in previous}
        log = ProgressLog(progress_path(self.output_dir, self.shard_index, self.shard_count))
        counts = self._counts(items, latest)
        log.write(
            "start",
            total=len(items),
            todo=len(todo),
            shard=f"{self.shard_index}/{self.shard_count}",
            backend=self.config.backend,
            model=self.config.model,
            **counts,
        )
        stopped = None
        try:
            stopped = self._caption(todo, items, latest, log)
        except KeyboardInterrupt:
            log.write("stopped", reason="interrupted", total=len(items), **self._counts(items, latest))
            log.close()
            raise
        summary = self._finish(items, latest, log, skipped=len(items) - len(todo), stopped=stopped)
        log.close()
        return summary

    def _write_manifest(self) -> None:
        """Tell `caption_source="auto"` readers (training) where this run's captions are."""
        formats = self.config.formats
        source = (
            self.config.sidecar_extension if "sidecar" in formats else "metadata.jsonl" if "jsonl" in formats else None
        )
        if source is not None:
            write_manifest(self.output_dir, source, written_by="training.recaption", formats=list(formats))

    def _counts(self, items: list[DatasetItem], latest: dict[str, dict]) -> dict[str, int]:
        statuses = [latest.get(item.key, {}).get("status") for item in items]
        return {
            "done": sum(s in ("ok", "failed") for s in statuses),
            "captioned": statuses.count("ok"),
            "failed": statuses.count("failed"),
        }

    def _caption(
        self, todo: list[DatasetItem], items: list[DatasetItem], latest: dict[str, dict], log: ProgressLog
    ) -> str | None:
        backend = self._backend or build_backend(self.config)
        bar = _progress_bar(len(todo)) if self.config.progress_bar else None
        try:
            for outcome in backend.caption_many(self._job(item) for item in todo):
                record = self._write_results(outcome.job.payload, self._record(outcome))
                latest[record["key"]] = record
                log.write("item", total=len(items), **self._counts(items, latest), **record)
                if record["status"] == "failed":
                    logger.warning("%s: %s", record["key"], record["reason"])
                if bar is not None:
                    bar.update(1)
        except BackendUnavailableError as error:
            logger.error("stopping: %s", error)
            return str(error)
        finally:
            if bar is not None:
                bar.close()
            if self._backend is None:
                backend.close()
        return None

    def _finish(
        self, items: list[DatasetItem], latest: dict[str, dict], log: ProgressLog, *, skipped: int, stopped: str | None
    ) -> RunSummary:
        suffix = shard_suffix(self.shard_index, self.shard_count)
        rows = [(item, latest[item.key]) for item in items if latest.get(item.key, {}).get("status") == "ok"]
        if "jsonl" in self.config.formats:
            name = "metadata.jsonl" if not suffix else f"metadata{suffix}.jsonl"
            write_metadata_jsonl(self.output_dir / name, rows)
        if "webdataset" in self.config.formats:
            write_webdataset(self.output_dir / f"captions{suffix}.tar", rows)
        if "parquet" in self.config.formats:
            write_parquet(self.output_dir / f"captions{suffix}.parquet", rows)
        records = [latest[item.key] for item in items if item.key in latest]
        report = build_report(
            records,
            target_words=self.template.target_words,
            token_limit=LENS_TEXT_TOKEN_LIMIT,
            token_counts_exact=self.counter.exact,
        )
        report.update(
            pending=len(items) - len(records), stopped_reason=stopped, shard=f"{self.shard_index}/{self.shard_count}"
        )
        path = report_path(self.output_dir, self.shard_index, self.shard_count)
        write_report(
            report,
            [r["words"] for r in records if r.get("status") == "ok"],
            path,
            lens_folder(self.output_dir) / f"recaption_histogram{suffix}.png",
        )
        counts = self._counts(items, latest)
        log.write("end", total=len(items), stopped_reason=stopped, report=path.name, **counts)
        return RunSummary(
            self.output_dir,
            len(items),
            counts["captioned"],
            counts["failed"],
            len(items) - counts["done"],
            skipped,
            stopped,
            path,
        )


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="recaption", dynamic_ncols=True)


def run(config: RecaptionConfig, backend: CaptionBackend | None = None) -> RunSummary:
    """Run ``config``; the programmatic twin of ``python -m training.recaption``."""
    started = time.monotonic()
    summary = RecaptionRunner(config, backend).run()
    logger.info(
        "%d captioned, %d failed, %d pending in %.1f s; report: %s",
        summary.captioned,
        summary.failed,
        summary.pending,
        time.monotonic() - started,
        summary.report_path,
    )
    return summary
