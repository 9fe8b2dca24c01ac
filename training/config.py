"""Training configuration: typed dataclasses read from YAML, with presets by card size and `key=value` overrides.

Every field carries its help text and checks (`training.typed_config.setting`); keys, types and ranges are handled by
the config mechanism shared with `RecaptionConfig`: an unknown or misspelled key is an error naming the closest known
one, and a value of the wrong type or outside its allowed set is an error naming the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lens_core.image_io import DEFAULT_MAX_PIXELS
from lens_core.presets import MAX_STEPS

from .dataset import DATASET_FORMATS
from .typed_config import apply_values, check_fields, nest, setting
from .typed_config import config_help as _fields_help

# The names other modules of `training` use for the shared mechanism.
_apply = apply_values
_nest = nest
_f = setting

BASE_PRECISIONS = ("fp32", "bf16", "fp8", "nf4", "int8")


@dataclass
class ModelConfig:
    """Which Lens checkpoint to fine-tune and how the frozen base is stored."""

    path: str = _f("microsoft/Lens-Base", "Hub id (mirrors are tried), local folder of the base model, or 'tiny'.")
    transformer_file: str | None = _f(None, "Optional Comfy-Org single-file denoiser used instead of transformer/.")
    base_precision: str = _f(
        "bf16",
        "Frozen base weights: fp32, bf16, or quantized exactly as the app runs them (lens_core.quantization): fp8 "
        "(float8 e4m3 weight-only, torchao), int8 or nf4 (bitsandbytes, QLoRA).",
        choices=BASE_PRECISIONS,
    )
    max_sequence_length: int = _f(512, "Token window of the text encoder (preamble + caption + suffix).", minimum=1)


@dataclass
class DataConfig:
    """Where the images and captions are and how they become training samples."""

    path: str | None = _f(
        None,
        "Dataset: image folder (caption sidecars and/or metadata.jsonl), webdataset .tar (or a folder of them), "
        ".parquet, or a Recaption output folder as it is.",
    )
    format: str = _f(
        "auto",
        "Which dataset of the folder to read when it holds several (images, .tar shards, .parquet): auto picks "
        "images, then webdataset, then parquet, and logs the choice.",
        choices=DATASET_FORMATS,
    )
    caption_source: str = _f(
        "auto",
        "Where each caption comes from: auto (what Recaption recorded in _lens/dataset.json, else metadata.jsonl, else "
        ".txt sidecars), a sidecar extension such as .txt or .lens.txt, metadata.jsonl, or column:NAME (a "
        "metadata.jsonl field or Parquet column, e.g. column:original_text for the alt-text).",
    )
    buckets: str | list = _f("lens", "'lens' = Lens's 27 training buckets, or a list of [width, height] pairs.")
    max_upscale: float = _f(1.25, "Largest allowed upscale factor when fitting an image to its bucket.", minimum=1.0)
    max_image_pixels: int = _f(
        DEFAULT_MAX_PIXELS, "Images with more pixels than this are listed as bad (decompression bombs).", minimum=1
    )
    max_bad_fraction: float = _f(
        0.2,
        "Unreadable images are listed in data_report.json and skipped; above this share of the dataset the run stops "
        "before loading the model.",
        minimum=0.0,
        maximum=1.0,
    )
    repeats: int = _f(1, "How often each image appears per epoch.", minimum=1)
    trigger_word: str = _f("", "Text put in front of every caption (and stored in the LoRA's metadata).")
    caption_dropout: float = _f(
        0.1, "Probability of training a sample with empty text (what guidance's negative uses).", minimum=0, maximum=1
    )
    validation_count: int = _f(
        0, "Images held out for the validation loss (taken from the end of the sorted list).", minimum=0
    )
    cache_dir: str | None = _f(None, "Feature cache folder (default: <output_dir>/cache).")


@dataclass
class AdapterConfig:
    """What is trained: a LoRA, a LoKr or the whole denoiser."""

    method: str = _f("lora", "lora, lokr, or full (full fine-tuning, large cards).", choices=("lora", "lokr", "full"))
    rank: int = _f(16, "Adapter rank.", minimum=1)
    alpha: float = _f(16.0, "Adapter alpha; the update is scaled by alpha / rank.", minimum=0, exclusive_minimum=True)
    dropout: float = _f(0.0, "LoRA dropout.", minimum=0, maximum=1)
    target_modules: list[str] = _f(
        [], "Module name suffixes to adapt; empty = attention projections and MLPs of both streams."
    )
    train_modulation: bool = _f(False, "Also adapt img_mod / txt_mod (excluded by default).")
    lokr_factor: int = _f(-1, "LoKr decomposition factor (-1 = automatic).")


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: str = _f(
        "adamw", "adamw, adamw8bit (bitsandbytes) or adafactor.", choices=("adamw", "adamw8bit", "adafactor")
    )
    learning_rate: float = _f(1e-4, "Peak learning rate.", minimum=0, exclusive_minimum=True)
    weight_decay: float = _f(0.01, "Decoupled weight decay.", minimum=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", minimum=0)
    scheduler: str = _f("constant", "constant or cosine (after the warm-up).", choices=("constant", "cosine"))
    warmup_steps: int = _f(0, "Linear warm-up steps.", minimum=0)


@dataclass
class LoopConfig:
    """The training loop itself."""

    max_steps: int = _f(1000, "Optimizer steps to train.", minimum=1)
    batch_size: int = _f(1, "Samples per micro-batch (all from one bucket).", minimum=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", minimum=1)
    mixed_precision: str = _f(
        "bf16",
        "Autocast precision on CUDA: fp32 (off), bf16 or fp16 (a CPU always computes in fp32).",
        choices=("fp32", "bf16", "fp16"),
    )
    gradient_checkpointing: bool = _f(True, "Recompute block activations in the backward pass (less memory).")
    seed: int = _f(0, "Seed for data order, noise, timesteps and adapter init.")
    timestep_logit_mean: float = _f(0.0, "Mean of the logit-normal timestep distribution (before the shift).")
    timestep_logit_std: float = _f(
        1.0, "Std of the logit-normal timestep distribution.", minimum=0, exclusive_minimum=True
    )
    shift_steps: int = _f(
        50, "Step count used for the bucket's mu (the shift follows each bucket's token count).", minimum=1
    )
    ema_decay: float = _f(
        0.0,
        "EMA of the trained weights (0 = off, e.g. 0.999); the final LoRA uses the EMA.",
        minimum=0,
        maximum=0.99999,
    )
    fsdp: bool = _f(
        False, "Shard the model with FSDP under `accelerate launch` (full fine-tuning on several GPUs; needs CUDA)."
    )


@dataclass
class MonitorConfig:
    """Samples, validation, checkpoints and logs."""

    sample_prompts: list[str] = _f(
        [], "Prompts sampled at step 0 and every sample_every steps (empty = the first captions)."
    )
    sample_seeds: list[int] = _f([0], "One seed per sample image (fixed, so samples are comparable over time).")
    sample_every: int = _f(250, "Sample every N steps (0 = only at the start and the end).", minimum=0)
    sample_steps: int = _f(20, "Sampler steps for the samples.", minimum=1, maximum=MAX_STEPS)
    sample_guidance: float = _f(4.0, "Guidance scale for the samples.", minimum=0)
    sample_size: list[int] = _f([1024, 1024], "Sample [width, height].")
    validate_every: int = _f(100, "Validation loss every N steps (needs data.validation_count > 0).", minimum=1)
    checkpoint_every: int = _f(250, "Full training state every N steps.", minimum=1)
    keep_checkpoints: int = _f(3, "Newest checkpoints kept (older ones are deleted).", minimum=1)
    tensorboard: bool = _f(True, "Write TensorBoard logs to <output_dir>/logs.")


@dataclass
class TrainConfig:
    """A complete training run. The defaults plus --model/--data/--output-dir are already a valid run."""

    preset: str | None = _f(
        None, "Preset applied before the other keys: 12gb, 16gb, 24gb, 48gb (card sizes) or cpu (a CPU demo)."
    )
    output_dir: str = _f(
        "outputs/train/run", "Run folder: config.yaml, checkpoints, samples, logs, progress.jsonl, final LoRA."
    )
    name: str = _f("lens-lora", "File stem of the exported LoRA.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Card-size presets: the memory knobs only. Each is the most a card of that size does by the simulated peak of
# one training step and of the sampling between steps (training/memory_table.json, BENCHMARKS.md): the samples'
# float32 VAE decode at 1024x1024 is the peak of every LoRA preset from 12gb up.
PRESETS: dict[str, dict] = {
    "8gb": {  # simulated 6.9 GiB: QLoRA on all 27 buckets, samples at 512
        "model.base_precision": "nf4",
        "adapter.method": "lora",
        "adapter.rank": 16,
        "optimizer.name": "adamw8bit",
        "loop.gradient_checkpointing": True,
        "data.buckets": "lens",
        "monitor.sample_size": [512, 512],
    },
    "12gb": {  # simulated 10.5 GiB: an fp8 base instead of NF4, rank 32, all 27 buckets, samples at 1024
        "model.base_precision": "fp8",
        "adapter.method": "lora",
        "adapter.rank": 32,
        "adapter.alpha": 32.0,
        "optimizer.name": "adamw8bit",
        "loop.gradient_checkpointing": True,
        "data.buckets": "lens",
    },
    "16gb": {  # simulated 13.8 GiB: no quantized base, rank 64
        "model.base_precision": "bf16",
        "adapter.method": "lora",
        "adapter.rank": 64,
        "adapter.alpha": 64.0,
        "optimizer.name": "adamw8bit",
        "loop.gradient_checkpointing": True,
        "data.buckets": "lens",
    },
    "24gb": {  # simulated 16.7 GiB: rank 128 with 32-bit AdamW (without checkpointing even 768 needs 27.8 GiB)
        "model.base_precision": "bf16",
        "adapter.method": "lora",
        "adapter.rank": 128,
        "adapter.alpha": 128.0,
        "optimizer.name": "adamw",
        "loop.gradient_checkpointing": True,
        "data.buckets": "lens",
    },
    "48gb": {  # simulated 43.4 GiB: float32 master weights and gradients, bf16 autocast copies, Adafactor
        "model.base_precision": "bf16",
        "adapter.method": "full",
        "optimizer.name": "adafactor",
        "optimizer.learning_rate": 1e-5,
        "loop.gradient_checkpointing": True,
        "data.buckets": "lens",
    },
    # A CPU machine (the offline demo with the tiny model): plain fp32 weights, no CUDA-only parts, 512-area buckets.
    "cpu": {
        "model.base_precision": "fp32",
        "adapter.method": "lora",
        "adapter.rank": 8,
        "optimizer.name": "adamw",
        "loop.mixed_precision": "fp32",
        "loop.gradient_checkpointing": False,
        "data.buckets": "lens-512",
        "monitor.sample_size": [512, 512],
        "monitor.sample_steps": 8,
    },
}
PRESET_ORDER = ("8gb", "12gb", "16gb", "24gb", "48gb")  # card sizes, smallest first
PRESET_NAMES = (*PRESET_ORDER, "cpu")
BUCKET_SETS = ("lens", "lens-512", "lens-768", "lens-1024")


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, object]:
    """'loop.max_steps=200' -> ('loop.max_steps', 200); the value is read as YAML (numbers, lists, booleans)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value (e.g. optimizer.learning_rate=2e-4), got {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"--set {key.strip()}: cannot read the value {raw!r} ({error}).") from None
    return key.strip(), value


def build_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML values <- dotted overrides, then checked."""
    file_values = dict(file_values or {})
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", file_values.get("preset"))
    config = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}.")
        apply_values(config, nest(PRESETS[preset]))
    apply_values(config, file_values)
    apply_values(config, nest(overrides))
    config.preset = preset
    validate_config(config)
    return config


def load_config_file(path: str | Path) -> dict:
    """Read a YAML config into a plain mapping (sections as nested mappings)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}.")
    return values


def _check_size_pairs(name: str, pairs: list) -> None:
    for pair in pairs:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in pair)
        ):
            raise ValueError(f"each {name} entry must be [width, height] in positive multiples of 16, got {pair!r}.")


def _check_caption_source(source: str) -> None:
    if source in ("auto", "metadata.jsonl") or (source.startswith(".") and "/" not in source and len(source) > 1):
        return
    if source.startswith("column:") and source.removeprefix("column:").strip():
        return
    raise ValueError(
        f"data.caption_source must be auto, a sidecar extension such as .txt or .lens.txt, metadata.jsonl or "
        f"column:NAME, got {source!r}."
    )


def validate_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad value and what is allowed."""
    check_fields(config)
    _check_caption_source(config.data.caption_source)
    buckets = config.data.buckets
    if isinstance(buckets, str) and buckets not in BUCKET_SETS:
        raise ValueError(
            f"data.buckets must be one of {list(BUCKET_SETS)} or a list of [width, height], got {buckets!r}."
        )
    if isinstance(buckets, list):
        if not buckets:
            raise ValueError("data.buckets is an empty list; give at least one [width, height].")
        _check_size_pairs("data.buckets", buckets)
    _check_size_pairs("monitor.sample_size", [config.monitor.sample_size])
    if not config.monitor.sample_seeds:
        raise ValueError("monitor.sample_seeds must be a non-empty list of integers, got [].")
    if config.adapter.method == "full" and config.model.base_precision in ("fp8", "nf4", "int8"):
        raise ValueError(
            f"adapter.method 'full' trains the base itself, so model.base_precision must be fp32 or bf16, "
            f"got {config.model.base_precision!r} (quantized bases are for LoRA/LoKr: QLoRA)."
        )
    if config.data.path is None:
        raise ValueError("data.path is required: give --data FOLDER (or data.path in the config).")


def config_help() -> str:
    """Every key with its default and help text, for `--help-config`."""
    return _fields_help(TrainConfig())
