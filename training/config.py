"""Training configuration: typed dataclasses read from YAML, with presets by card size and `key=value` overrides.

Every field carries its help text in `metadata["help"]`. An unknown or misspelled key is an error naming the key (and
the closest known one); a value of the wrong type or outside its allowed set is an error naming the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def _f(default, help: str, **kwargs):  # noqa: A002 (mirrors argparse's name)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelConfig:
    """Which Lens checkpoint to fine-tune and how the frozen base is stored."""

    path: str = _f("microsoft/Lens-Base", "Hub id (mirrors are tried) or local folder of the base model.")
    transformer_file: str | None = _f(None, "Optional Comfy-Org single-file denoiser used instead of transformer/.")
    base_precision: str = _f(
        "bf16",
        "Frozen base weights: fp32, bf16, fp8 (float8 e4m3 storage), nf4 or int8 (bitsandbytes, QLoRA).",
        choices=("fp32", "bf16", "fp8", "nf4", "int8"),
    )
    max_sequence_length: int = _f(512, "Token window of the text encoder (preamble + caption + suffix).")


@dataclass
class DataConfig:
    """Where the images and captions are and how they become training samples."""

    path: str | None = _f(
        None, "Dataset: image folder (.txt sidecars and/or metadata.jsonl), webdataset .tar, or .parquet."
    )
    buckets: str | list = _f("lens", "'lens' = Lens's 27 training buckets, or a list of [width, height] pairs.")
    max_upscale: float = _f(1.25, "Largest allowed upscale factor when fitting an image to its bucket.")
    repeats: int = _f(1, "How often each image appears per epoch.")
    trigger_word: str = _f("", "Text put in front of every caption (and stored in the LoRA's metadata).")
    caption_dropout: float = _f(
        0.1, "Probability of training a sample with empty text (what guidance's negative uses)."
    )
    validation_count: int = _f(0, "Images held out for the validation loss (taken from the end of the sorted list).")
    cache_dir: str | None = _f(None, "Feature cache folder (default: <output_dir>/cache).")


@dataclass
class AdapterConfig:
    """What is trained: a LoRA, a LoKr or the whole denoiser."""

    method: str = _f("lora", "lora, lokr, or full (full fine-tuning, large cards).", choices=("lora", "lokr", "full"))
    rank: int = _f(16, "Adapter rank.")
    alpha: float = _f(16.0, "Adapter alpha; the update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "LoRA dropout.")
    target_modules: list = _f(
        [], "Module name suffixes to adapt; empty = attention projections and MLPs of both streams."
    )
    train_modulation: bool = _f(False, "Also adapt img_mod / txt_mod (excluded by default).")
    lokr_factor: int = _f(-1, "LoKr decomposition factor (-1 = automatic).")


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: str = _f(
        "adamw", "adamw, adamw8bit (bitsandbytes, CUDA) or adafactor.", choices=("adamw", "adamw8bit", "adafactor")
    )
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    weight_decay: float = _f(0.01, "Decoupled weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    scheduler: str = _f("constant", "constant or cosine (after the warm-up).", choices=("constant", "cosine"))
    warmup_steps: int = _f(0, "Linear warm-up steps.")


@dataclass
class LoopConfig:
    """The training loop itself."""

    max_steps: int = _f(1000, "Optimizer steps to train.")
    batch_size: int = _f(1, "Samples per micro-batch (all from one bucket).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    mixed_precision: str = _f(
        "bf16", "Autocast precision on CUDA: fp32 (off), bf16 or fp16.", choices=("fp32", "bf16", "fp16")
    )
    gradient_checkpointing: bool = _f(True, "Recompute block activations in the backward pass (less memory).")
    seed: int = _f(0, "Seed for data order, noise, timesteps and adapter init.")
    timestep_logit_mean: float = _f(0.0, "Mean of the logit-normal timestep distribution (before the shift).")
    timestep_logit_std: float = _f(1.0, "Std of the logit-normal timestep distribution.")
    shift_steps: int = _f(50, "Step count used for the bucket's mu (the shift follows each bucket's token count).")
    ema_decay: float = _f(0.0, "EMA of the trained weights (0 = off, e.g. 0.999); the final LoRA uses the EMA.")
    fsdp: bool = _f(False, "Shard the model with FSDP under `accelerate launch` (full fine-tuning on several GPUs).")


@dataclass
class MonitorConfig:
    """Samples, validation, checkpoints and logs."""

    sample_prompts: list = _f(
        [], "Prompts sampled at step 0 and every sample_every steps (empty = the first captions)."
    )
    sample_seeds: list = _f([0], "One seed per sample image (fixed, so samples are comparable over time).")
    sample_every: int = _f(250, "Sample every N steps (0 = only at the start and the end).")
    sample_steps: int = _f(20, "Sampler steps for the samples.")
    sample_guidance: float = _f(4.0, "Guidance scale for the samples.")
    sample_size: list = _f([1024, 1024], "Sample [width, height].")
    validate_every: int = _f(100, "Validation loss every N steps (needs data.validation_count > 0).")
    checkpoint_every: int = _f(250, "Full training state every N steps.")
    keep_checkpoints: int = _f(3, "Newest checkpoints kept (older ones are deleted).")
    tensorboard: bool = _f(True, "Write TensorBoard logs to <output_dir>/logs.")


@dataclass
class TrainConfig:
    """A complete training run. The defaults plus --model/--data/--output-dir are already a valid run."""

    preset: str | None = _f(None, "Card-size preset applied before the other keys: 12gb, 16gb, 24gb or 48gb.")
    output_dir: str = _f("outputs/train/run", "Run folder: checkpoints, samples, logs, progress.jsonl, final LoRA.")
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
    "8gb": {  # simulated 7.0 GiB: QLoRA on all 27 buckets, samples at 512
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
}
PRESET_ORDER = ("8gb", "12gb", "16gb", "24gb", "48gb")
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
BUCKET_SETS = ("lens", "lens-512", "lens-768", "lens-1024")


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------------------------


def _coerce(value, annotation, key: str):
    """Check `value` against a field annotation (str | None, int, float, bool, list, str | list)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    if float in options and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string; it is plainly a number
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, list) and isinstance(value, option):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"Config key {key!r} must be {names}, got {value!r} ({type(value).__name__}).")


def _apply(target, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys here: {names}."
            raise ValueError(f"Unknown config key {full!r}.{hint}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"Config key {full!r} is a section; give a mapping, got {value!r}.")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(target, key, _coerce(value, hints[key], full))


def _nest(dotted: dict) -> dict:
    nested: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def parse_override(text: str) -> tuple[str, object]:
    """'loop.max_steps=200' -> ('loop.max_steps', 200); the value is read as YAML (numbers, lists, booleans)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value (e.g. optimizer.learning_rate=2e-4), got {text!r}.")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def build_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML values <- dotted overrides, then checked."""
    file_values = dict(file_values or {})
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", file_values.get("preset"))
    config = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {list(PRESET_ORDER)}.")
        _apply(config, _nest(PRESETS[preset]))
    _apply(config, file_values)
    _apply(config, _nest(overrides))
    config.preset = preset
    validate_config(config)
    return config


def load_config_file(path: str | Path) -> dict:
    """Read a YAML config into a plain mapping (sections as nested mappings)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}.")
    return values


def _check_choices(section, prefix: str) -> None:
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices and value not in choices:
            raise ValueError(f"{prefix}{f.name} must be one of {list(choices)}, got {value!r}.")


def _check_range(name: str, value, low, high=None, low_inclusive=True) -> None:
    ok = (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}.")


def validate_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad value and what is allowed."""
    for name in ("model", "adapter", "optimizer", "loop"):
        _check_choices(getattr(config, name), f"{name}.")
    _check_range("adapter.rank", config.adapter.rank, 1)
    _check_range("adapter.alpha", config.adapter.alpha, 0, low_inclusive=False)
    _check_range("adapter.dropout", config.adapter.dropout, 0, 1)
    _check_range("data.caption_dropout", config.data.caption_dropout, 0, 1)
    _check_range("data.repeats", config.data.repeats, 1)
    _check_range("data.max_upscale", config.data.max_upscale, 1.0)
    _check_range("data.validation_count", config.data.validation_count, 0)
    _check_range("optimizer.learning_rate", config.optimizer.learning_rate, 0, low_inclusive=False)
    _check_range("optimizer.warmup_steps", config.optimizer.warmup_steps, 0)
    _check_range("loop.max_steps", config.loop.max_steps, 1)
    _check_range("loop.batch_size", config.loop.batch_size, 1)
    _check_range("loop.gradient_accumulation_steps", config.loop.gradient_accumulation_steps, 1)
    _check_range("loop.ema_decay", config.loop.ema_decay, 0, 0.99999)
    _check_range("loop.timestep_logit_std", config.loop.timestep_logit_std, 0, low_inclusive=False)
    _check_range("monitor.checkpoint_every", config.monitor.checkpoint_every, 1)
    _check_range("monitor.keep_checkpoints", config.monitor.keep_checkpoints, 1)
    _check_range("monitor.validate_every", config.monitor.validate_every, 1)
    _check_range("monitor.sample_every", config.monitor.sample_every, 0)
    _check_range("monitor.sample_steps", config.monitor.sample_steps, 1)
    buckets = config.data.buckets
    if isinstance(buckets, str) and buckets not in BUCKET_SETS:
        raise ValueError(
            f"data.buckets must be one of {list(BUCKET_SETS)} or a list of [width, height], got {buckets!r}."
        )
    if isinstance(buckets, list):
        for pair in buckets:
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in pair)
            ):
                raise ValueError(
                    f"each data.buckets entry must be [width, height] in positive multiples of 16, got {pair!r}."
                )
    size = config.monitor.sample_size
    if not (len(size) == 2 and all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in size)):
        raise ValueError(f"monitor.sample_size must be [width, height] in positive multiples of 16, got {size!r}.")
    if not config.monitor.sample_seeds or not all(isinstance(s, int) for s in config.monitor.sample_seeds):
        raise ValueError(
            f"monitor.sample_seeds must be a non-empty list of integers, got {config.monitor.sample_seeds!r}."
        )
    if config.adapter.method == "full" and config.model.base_precision in ("fp8", "nf4", "int8"):
        raise ValueError(
            f"adapter.method 'full' trains the base itself, so model.base_precision must be fp32 or bf16, "
            f"got {config.model.base_precision!r} (quantized bases are for LoRA/LoKr: QLoRA)."
        )
    if config.data.path is None:
        raise ValueError("data.path is required: give --data FOLDER (or data.path in the config).")


def config_help() -> str:
    """Every key with its default and help text, for `--help-config`."""
    lines = []

    def walk(section, prefix):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {value!r}\n      {f.metadata.get('help', '')}")

    walk(TrainConfig(), "")
    return "\n".join(lines)
