"""Everything a training run can check before it loads a model, in seconds: the output folder is writable, the
resume target exists, the options fit this machine, the base model is where it is said to be, and the dataset is
readable, captioned and mostly decodable (bad images are listed in `<output_dir>/data_report.json` and skipped),
and, on a GPU, that the simulated peak of this config fits the card (`training.memory_estimate`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_precision import QUANTIZED_BASES
from .checkpoint import resolve_resume
from .config import TrainConfig
from .data import DataPlan, inspect_dataset
from .memory_estimate import fit_problem, training_peak

logger = logging.getLogger(__name__)
DATA_REPORT = "data_report.json"


@dataclass
class Preflight:
    """What the checks found: the checkpoint to resume (or None) and the checked dataset."""

    checkpoint: Path | None
    plan: DataPlan


def check_output_dir(folder: Path) -> None:
    """Create `folder` and prove a file can be written there; ValueError naming the folder and the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir {folder} is not writable: {error.strerror or error}.") from None


def check_device_options(config: TrainConfig) -> None:
    """Refuse options this machine cannot run (CUDA-only ones without CUDA, missing optional packages)."""
    from lens_core.quantization import check_precision_available

    cuda = torch.cuda.is_available()
    if config.loop.fsdp and not cuda:
        raise ValueError("loop.fsdp=true shards the model over CUDA GPUs (accelerate launch); this machine has none.")
    precision = config.model.base_precision
    if precision in QUANTIZED_BASES:
        check_precision_available(precision, "cuda" if cuda else "cpu")  # names the package and its install command
    if config.optimizer.name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"optimizer.name 'adamw8bit' needs bitsandbytes ({error}); pip install bitsandbytes, or use adamw."
            ) from None
    if not cuda and config.loop.mixed_precision != "fp32":
        logger.info(
            "loop.mixed_precision=%s applies on CUDA only: this CPU run computes in fp32.", config.loop.mixed_precision
        )


def check_model_source(config: TrainConfig) -> None:
    """A local model folder must hold a Lens checkpoint, and a transformer_file must exist; Hub ids are left to the
    loader (they may still be downloaded)."""
    from lens_core.loading import is_repo_id, read_model_index
    from lens_core.presets import TINY_MODEL

    path = config.model.path
    folder = Path(path).expanduser()
    if path != TINY_MODEL and folder.exists():
        if not folder.is_dir():
            raise ValueError(
                f"model.path {path} is a file; give a checkpoint folder (a single-file denoiser goes in model.transformer_file)."
            )
        read_model_index(folder)
    elif path != TINY_MODEL and not is_repo_id(path):
        raise ValueError(f"model.path {path!r} is neither an existing folder, a Hub repo id 'owner/name', nor 'tiny'.")
    if config.model.transformer_file and not Path(config.model.transformer_file).is_file():
        raise ValueError(f"model.transformer_file {config.model.transformer_file} does not exist.")


def component_configs(path: str) -> tuple[dict | None, dict | None]:
    """The denoiser's and the VAE's config.json, read without loading a weight: from a local folder, 'tiny' (built
    once in the cache) or a Hub id already in the local cache; None for what is not here yet (then the real Lens is
    what gets simulated, which is what an official repo holds)."""
    from lens_core.loading import CheckpointError, resolve_checkpoint

    try:
        folder, _ = resolve_checkpoint(path, local_files_only=True)
    except (CheckpointError, OSError, ValueError):
        return None, None

    def read(component: str) -> dict | None:
        file = folder / component / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

    return read("transformer"), read("vae")


def check_memory_fit(config: TrainConfig, gpu_gib: float | None) -> None:
    """On a GPU of `gpu_gib` GiB (None: no GPU, nothing to check): refuse a config whose simulated peak does not fit,
    naming the preset that does, before the model is loaded and the features cached."""
    if gpu_gib is None:
        return
    peak = training_peak(config, *component_configs(config.model.path))
    problem = fit_problem(config, gpu_gib, peak=peak)
    if problem:
        raise ValueError(problem)
    logger.info(
        "Simulated peak %.1f GiB (%.1f GiB with the CUDA margin) fits the %.1f GiB GPU",
        peak.peak_gib,
        peak.card_gib,
        gpu_gib,
    )


def run_preflight(config: TrainConfig, resume: str | None, gpu_gib: float | None = None) -> Preflight:
    """All checks, in the order of their cost; writes the dataset report. Raises ValueError on the first problem.
    `gpu_gib`: the memory of the GPU this process trains on (None: a CPU run)."""
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    checkpoint = resolve_resume(output_dir, resume)
    check_device_options(config)
    check_model_source(config)
    check_memory_fit(config, gpu_gib)
    plan = inspect_dataset(config.data, report_path=output_dir / DATA_REPORT)
    report = plan.report
    logger.info(
        "Dataset %s (%s, captions from %s): %d usable of %d images; %d without caption, %d unreadable, %d too small "
        "(details: %s)",
        report.dataset,
        report.format,
        report.caption_source,
        report.usable,
        report.images,
        len(report.missing_captions),
        len(report.bad_images),
        len(report.too_small),
        output_dir / DATA_REPORT,
    )
    return Preflight(checkpoint, plan)
