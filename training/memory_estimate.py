"""Will a training config fit the GPU? Simulated peak memory of one optimizer step at real size.

`simulate_training(config, bucket)` runs one full optimizer step of the real-size denoiser under fake tensors
(`lens_core.memory_sim`): the trainer's own model building (frozen base in its precision, the adapter on the
trainer's target layers, fp32 trainable weights, gradient checkpointing), the trainer's optimizer with its states
(8-bit AdamW's uint8 states and block absmax, Adafactor's factored states), the trainer's loss under bf16 autocast,
gradient clipping, and the step; then the sampling the trainer does between steps (the pipeline with guidance at
`monitor.sample_size`, float32 VAE in one piece). Peaks are live tensor bytes; `lens_core.memory_sim.required_card_gib`
adds the CUDA margin.

Every preset x bucket size is simulated once and cached in `training/memory_table.json`
(`python -m training.bench_memory --simulate --write-table`); a config that is not in the table is simulated when
it is checked (about half a minute on a CPU, once per run).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lens_core.memory_sim import (
    CHECK_TRANSFORMER_CONFIG,
    CHECK_VAE_CONFIG,
    GIB,
    HOST,
    REAL_PREFIX_TOKENS,
    margin_constants,
    required_card_gib,
)
from lens_core.presets import PIXELS_PER_TOKEN

from .config import PRESET_ORDER, PRESETS, TrainConfig, build_config
from .data import bucket_list

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("memory_table.json")
REGENERATE_COMMAND = "python -m training.bench_memory --simulate --write-table"
BUCKET_AREAS = (512, 768, 1024)
# Cached features are cut to the prompt window: at most 512 - 97 = 415 text tokens reach the denoiser (LENS_SPEC 3.1).
TEXT_TOKENS = 512 - REAL_PREFIX_TOKENS
# The small configuration the test suite simulates again and compares with the cached table (the denoiser and
# VAE of lens_core.memory_sim's check configuration).
CHECK_BUCKETS = ((256, 256), (256, 512))


@dataclass(frozen=True)
class TrainingCase:
    """What decides a training step's memory, read from a config (and the bucket it trains)."""

    base_precision: str
    method: str
    rank: int
    optimizer: str
    gradient_checkpointing: bool
    batch_size: int
    gradient_accumulation_steps: int
    width: int
    height: int
    sample_width: int
    sample_height: int
    sample_guidance: float
    targets: tuple[str, ...]
    train_modulation: bool
    ema: bool

    @classmethod
    def from_config(cls, config: TrainConfig, bucket: tuple[int, int]) -> TrainingCase:
        method = config.adapter.method
        return cls(
            base_precision="fp32" if method == "full" else config.model.base_precision,
            method=method,
            rank=0 if method == "full" else config.adapter.rank,
            optimizer=config.optimizer.name,
            gradient_checkpointing=config.loop.gradient_checkpointing,
            batch_size=config.loop.batch_size,
            gradient_accumulation_steps=min(config.loop.gradient_accumulation_steps, 2),  # 2: grads live in forward
            width=bucket[0],
            height=bucket[1],
            sample_width=config.monitor.sample_size[0],
            sample_height=config.monitor.sample_size[1],
            sample_guidance=config.monitor.sample_guidance,
            targets=tuple(config.adapter.target_modules),
            train_modulation=config.adapter.train_modulation,
            ema=config.loop.ema_decay > 0,
        )

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class TrainingPeak:
    """Simulated GPU memory of a training run, GiB: the step (forward, backward, clipping, optimizer step with its
    states), the sampling between steps, and the larger of the two with the CUDA margin (`card_gib`)."""

    weights_gib: float  # frozen base + trainable weights + VAE, before anything runs
    optimizer_state_gib: float
    step_peak_gib: float
    sample_peak_gib: float
    peak_gib: float = 0.0
    card_gib: float = 0.0

    def __post_init__(self):
        self.peak_gib = max(self.step_peak_gib, self.sample_peak_gib)
        self.card_gib = required_card_gib(self.peak_gib)


def largest_bucket(buckets) -> tuple[int, int]:
    """The bucket with the most image tokens (the one that decides the peak)."""
    return max(bucket_list(buckets), key=lambda size: (size[0] // PIXELS_PER_TOKEN) * (size[1] // PIXELS_PER_TOKEN))


def preset_config(name: str, overrides: dict | None = None) -> TrainConfig:
    """The complete config of preset `name` (plus dotted `overrides`)."""
    return build_config({"data": {"path": "."}}, {"preset": name, **(overrides or {})})


# ----------------------------------------------------------------------------------------------------------------
# The simulation
# ----------------------------------------------------------------------------------------------------------------


def simulate_training(
    config: TrainConfig,
    bucket: tuple[int, int],
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    sample: bool = True,
    fake: bool = True,
) -> TrainingPeak:
    """One full optimizer step of `config` on `bucket` (width, height), then the sampling; real size by default.
    `fake=False` runs the same on real CPU tensors (random weights), counted by the same tracker: the calibration."""
    from lens_core.memory_sim import real_tracking, simulation

    case = TrainingCase.from_config(config, bucket)
    # The training simulation runs on the fake CPU device: see `lens_core.memory_sim.simulation`.
    with simulation(attention_as_cuda=False) if fake else real_tracking() as tracker:
        trainer, trainable, vae = _build_trainer(config, transformer_config, vae_config, random_weights=not fake)
        weights = tracker.bytes_on(HOST)
        optimizer = _build_optimizer(trainer, trainable)
        _initialise_states(optimizer, trainable)
        states = tracker.bytes_on(HOST) - weights
        tracker.reset_peak()
        _step(trainer, optimizer, trainable, case)
        step_peak = tracker.bytes_on(HOST, peak=True)
        sample_peak = _sample(trainer.model, vae, case, tracker) if sample else 0
    return TrainingPeak(weights / GIB, states / GIB, step_peak / GIB, sample_peak / GIB)


def _build_trainer(config: TrainConfig, transformer_config: dict | None, vae_config: dict | None, random_weights: bool):
    """The trainer's own `_build_model` on a fake real-size denoiser loaded in the trainer's dtype; a quantized base
    (fp8, NF4, int8) is stored in its real layout on the layers `freeze_base` quantizes (lens_core.quantization's keep
    list), since torchao and bitsandbytes cannot wrap fake tensors."""
    from diffusers import AutoencoderKLFlux2

    from lens_core.memory_sim import quantize_transformer_as_stored
    from lens_core.transformer_lens import LensTransformer2DModel

    from .base_precision import QUANTIZED_BASES
    from .trainer import LensTrainer

    config = copy.deepcopy(config)
    with torch.device("meta"):
        transformer = LensTransformer2DModel(**(transformer_config or {}))
        vae = AutoencoderKLFlux2(**(vae_config or {}))
    # As LensTrainer.load: float32 for full fine-tuning or an fp32 base, else bf16; the VAE in float32.
    keep_fp32 = config.model.base_precision == "fp32" or config.adapter.method == "full"
    transformer = nn.Module.to(transformer.to_empty(device=HOST), torch.float32 if keep_fp32 else torch.bfloat16)
    vae = nn.Module.to(vae.to_empty(device=HOST), torch.float32).eval().requires_grad_(False)
    if random_weights:  # a real run: values that keep the arithmetic finite
        with torch.no_grad():
            for tensor in [*transformer.parameters(), *vae.parameters()]:
                tensor.normal_(0.0, 0.02)
    precision = config.model.base_precision
    if config.adapter.method != "full" and precision in QUANTIZED_BASES:
        # freeze_base's layers in their storage layout; the trainer then builds on a base it sees as bf16 (which
        # leaves those byte buffers alone).
        transformer.requires_grad_(False).to(torch.bfloat16)
        quantize_transformer_as_stored(transformer, precision)
        config.model.base_precision = "bf16"
    trainer = LensTrainer(config)
    trainer.device = HOST
    transformer = trainer._build_model(transformer)
    trainer.model = transformer
    trainable = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    if config.loop.ema_decay:
        trainer.ema = [parameter.detach().float().clone() for parameter in trainable]  # as setup_training
    return trainer, trainable, vae


def _build_optimizer(trainer, trainable):
    """The trainer's optimizer. It refuses 8-bit AdamW off CUDA, and the fake CPU device stands for CUDA here;
    torch's AdamW defaults to the multi-tensor (foreach) implementation on CUDA, so it gets that too."""
    device = trainer.device
    trainer.device = torch.device("cuda", 0)  # only read for the CUDA check in _optimizer
    try:
        optimizer = trainer._optimizer(trainable)
    finally:
        trainer.device = device
    if isinstance(optimizer, torch.optim.AdamW):
        for group in optimizer.param_groups:
            group["foreach"] = True
    return optimizer


def _initialise_states(optimizer, trainable) -> None:
    """Optimizer states exist from the first step on, so the simulated step is a later one: one step on zero
    gradients creates them (each optimizer's own `step`), then the gradients are dropped."""
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step(trainer, optimizer, trainable, case: TrainingCase) -> None:
    """LensTrainer.train_step's work on one bucket-sized batch: autocast forward and backward (per micro-batch;
    gradients accumulate), clipping, optimizer step, gradients dropped. bf16 autocast runs as CPU autocast (same
    lower-precision ops as CUDA's for this model: linear, matmul, attention)."""
    grid = (case.height // PIXELS_PER_TOKEN, case.width // PIXELS_PER_TOKEN)
    tokens = grid[0] * grid[1]
    dtype = torch.float32 if case.base_precision == "fp32" else torch.bfloat16  # cached features: the load dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _micro in range(case.gradient_accumulation_steps):
            channels = trainer.model.config.in_channels
            latents = torch.empty(case.batch_size, tokens, channels)  # [B, L, C] float32, from the latent cache
            noise = torch.empty(case.batch_size, tokens, channels)
            width = trainer.model.config.enc_hidden_dim
            embeds = [torch.empty(case.batch_size, TEXT_TOKENS, width, dtype=dtype) for _ in range(4)]  # [B, S, D]
            mask = torch.ones(case.batch_size, TEXT_TOKENS, dtype=torch.bool)
            sigmas = torch.full((case.batch_size,), 0.5)
            loss = trainer.flow_loss(latents, embeds, mask, grid, sigmas, noise)
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(trainable, trainer.config.optimizer.max_grad_norm or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sample(transformer, vae, case: TrainingCase, tracker) -> int:
    """LensTrainer.write_samples: the pipeline with guidance at the sample size, with the training state resident."""
    from lens_core.memory_sim import pipeline_of

    pipe = pipeline_of(None, transformer, vae)
    transformer.eval()
    dtype = pipe.transformer_dtype
    layers = [torch.empty(1, TEXT_TOKENS, transformer.config.enc_hidden_dim, dtype=dtype) for _ in range(4)]
    tracker.reset_peak()
    with torch.no_grad():
        images = pipe(
            prompt_embeds=layers,
            prompt_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.bool),
            width=case.sample_width,
            height=case.sample_height,
            num_inference_steps=2,  # every step allocates the same
            guidance_scale=case.sample_guidance,
            output_type="pt",
        ).images
    del images
    transformer.train()
    return tracker.bytes_on(HOST, peak=True)


# ----------------------------------------------------------------------------------------------------------------
# The cached table
# ----------------------------------------------------------------------------------------------------------------


def simulate_preset_rows(
    presets=PRESET_ORDER, areas=BUCKET_AREAS, transformer_config=None, vae_config=None, buckets=None
) -> list[dict]:
    """Each preset x bucket area (its largest bucket), with the preset's checkpointing and with it flipped."""
    rows = []
    for name in presets:
        for index, area in enumerate(areas):
            config = preset_config(name)
            bucket = buckets[index] if buckets else largest_bucket(f"lens-{area}")
            for checkpointing in (config.loop.gradient_checkpointing, not config.loop.gradient_checkpointing):
                config.loop.gradient_checkpointing = checkpointing
                logger.info("Simulating preset %s at %dx%d (checkpointing %s)", name, *bucket, checkpointing)
                # The sampling does not depend on the bucket or on checkpointing: simulated once per preset.
                sample = index == 0 and checkpointing == preset_config(name).loop.gradient_checkpointing
                peak = simulate_training(config, bucket, transformer_config, vae_config, sample=sample)
                rows.append(
                    {
                        "preset": name,
                        "area": area,
                        "case": asdict(TrainingCase.from_config(config, bucket)),
                        "peak": asdict(peak),
                    }
                )
    _share_sampling_peaks(rows)
    return rows


def _share_sampling_peaks(rows: list[dict]) -> None:
    sampled = {row["preset"]: row["peak"]["sample_peak_gib"] for row in rows if row["peak"]["sample_peak_gib"]}
    for row in rows:
        peak = row["peak"]
        full = TrainingPeak(
            peak["weights_gib"], peak["optimizer_state_gib"], peak["step_peak_gib"], sampled[row["preset"]]
        )
        row["peak"] = asdict(full)


def build_training_table() -> dict:
    """The cached table: every preset at real size, plus the small check configuration."""
    return {
        "regenerate": REGENERATE_COMMAND,
        "torch": torch.__version__.split("+")[0],
        "text_tokens": TEXT_TOKENS,
        "margin": margin_constants(),
        "real": simulate_preset_rows(),
        "check": simulate_check_rows(),
    }


def simulate_check_rows() -> list[dict]:
    """The small configuration of the cached table (CHECK_*), simulated now."""
    return simulate_preset_rows(
        ("12gb", "48gb"), (512, 1024), CHECK_TRANSFORMER_CONFIG, CHECK_VAE_CONFIG, buckets=CHECK_BUCKETS
    )


def write_training_table(table: dict) -> None:
    from lens_core.atomic_io import atomic_write_text

    atomic_write_text(TABLE_PATH, json.dumps(table, indent=1, sort_keys=True) + "\n")
    load_training_table.cache_clear()


@functools.cache
def load_training_table() -> dict:
    """The cached preset table shipped with the package."""
    if not TABLE_PATH.is_file():
        raise ValueError(
            f"The simulated training table {TABLE_PATH} is missing; regenerate it with: {REGENERATE_COMMAND}"
        )
    return json.loads(TABLE_PATH.read_text())


# ----------------------------------------------------------------------------------------------------------------
# Using it: the fit check, the preset advice, the Train tab's suggestion
# ----------------------------------------------------------------------------------------------------------------


def is_real_size(transformer_config: dict | None) -> bool:
    """Whether a denoiser config is the real Lens (the cached table's model); None means the real one."""
    import inspect

    from lens_core.transformer_lens import LensTransformer2DModel

    if transformer_config is None:
        return True
    defaults = inspect.signature(LensTransformer2DModel.__init__).parameters
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "enc_hidden_dim", "in_channels", "patch_size")
    return all(transformer_config.get(key, defaults[key].default) == defaults[key].default for key in keys)


def training_peak(
    config: TrainConfig, transformer_config: dict | None = None, vae_config: dict | None = None
) -> TrainingPeak:
    """Simulated peak of `config` at its largest bucket: from the cached table when the table has this exact case
    for the real model, else simulated now (about half a minute on a CPU for the real size; a toy model is quick).
    `transformer_config` / `vae_config`: the loaded models' configs (None: the real Lens)."""
    from diffusers import AutoencoderKLFlux2

    from lens_core.transformer_lens import LensTransformer2DModel

    bucket = largest_bucket(config.data.buckets)
    if not is_real_size(transformer_config):
        return simulate_training(
            config,
            bucket,
            _init_keys(LensTransformer2DModel, transformer_config),
            None if vae_config is None else _init_keys(AutoencoderKLFlux2, vae_config),
        )
    cached = cached_training_peak(config)
    if cached is not None:
        return cached
    logger.info("This training config is not in the cached table; simulating one step (about half a minute).")
    return simulate_training(config, bucket)


def cached_training_peak(config: TrainConfig) -> TrainingPeak | None:
    """The cached table's peak for `config` on the real model at its largest bucket, None when not tabled."""
    key = TrainingCase.from_config(config, largest_bucket(config.data.buckets)).key()
    for row in load_training_table()["real"]:
        if _row_case(row).key() == key:
            return _row_peak(row)
    return None


def _init_keys(model_class, config: dict) -> dict:
    """The entries of a saved diffusers config that are `model_class`'s constructor arguments."""
    import inspect

    names = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    return {key: value for key, value in config.items() if key in names}


def _row_case(row: dict) -> TrainingCase:
    return TrainingCase(**{**row["case"], "targets": tuple(row["case"]["targets"])})


def _row_peak(row: dict) -> TrainingPeak:
    return TrainingPeak(**{k: v for k, v in row["peak"].items() if k not in ("peak_gib", "card_gib")})


def preset_peaks() -> dict[str, TrainingPeak]:
    """Each preset's simulated peak at its own buckets (the largest bucket decides), from the cached table (never
    simulated on the spot: the app asks at start-up)."""
    peaks = {name: cached_training_peak(preset_config(name)) for name in PRESET_ORDER}
    missing = [name for name, peak in peaks.items() if peak is None]
    if missing:
        raise ValueError(f"The cached training table has no row for the presets {missing}; run {REGENERATE_COMMAND}")
    return peaks


def fitting_preset(total_gib: float, adapters_only: bool = False) -> str | None:
    """The largest preset whose simulated need (with the CUDA margin) fits a `total_gib` card; `adapters_only` leaves
    out the full fine-tunes (for a caller that trains LoRAs)."""
    best = None
    for name, peak in preset_peaks().items():
        if adapters_only and PRESETS[name].get("adapter.method") == "full":
            continue
        if peak.card_gib <= total_gib:
            best = name
    return best


def suggest_preset(total_gib: float | None, adapters_only: bool = False) -> str | None:
    """The preset the Train tab proposes for a card of `total_gib` (None without a GPU, or when none fits)."""
    return None if total_gib is None else fitting_preset(total_gib, adapters_only)


def fit_problem(
    config: TrainConfig,
    total_gib: float,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    peak: TrainingPeak | None = None,
) -> str | None:
    """None when `config` fits a `total_gib` card by the simulation; else the message, naming the preset that fits.
    `peak`: `training_peak(config, ...)` when the caller has it already (a simulation can take half a minute)."""
    peak = peak or training_peak(config, transformer_config, vae_config)
    if peak.card_gib <= total_gib:
        return None
    preset = fitting_preset(total_gib)
    advice = (
        f"use --preset {preset}"
        if preset
        else "no preset fits this card; try data.buckets=lens-512, model.base_precision=nf4 and adapter.rank=8"
    )
    return (
        f"This config needs about {peak.card_gib:.1f} GiB of GPU memory (simulated peak {peak.peak_gib:.1f} GiB plus "
        f"the CUDA margin) but the GPU has {total_gib:.1f} GiB: {advice}."
    )


def detected_gpu_gib(index: int = 0) -> float | None:
    """Total memory of CUDA GPU `index` in GiB, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(index).total_memory / GIB


def preset_suggestion(total_gib: float | None, default: str = "16gb", adapters_only: bool = False) -> tuple[str, str]:
    """(preset, explanation) for the Train tab: the largest preset whose simulated need fits this GPU (`adapters_only`:
    LoRA/LoKr presets only), or `default` with the simulated needs listed when there is no GPU here (the run may go to
    another machine) or none fits."""
    try:
        peaks = preset_peaks()
    except ValueError as error:  # a stale table must not stop the app; the run's own check still simulates
        logger.warning("%s", error)
        return default, "The simulated preset table is out of date; every run still checks its own config."
    needs = ", ".join(f"{name} {peak.card_gib:.1f}" for name, peak in peaks.items())
    suggested = suggest_preset(total_gib, adapters_only)
    if total_gib is None:
        return default, f"No GPU detected here. Simulated GPU memory each preset needs (GiB): {needs}."
    if suggested is None:
        return default, f"No preset fits this {total_gib:.1f} GiB GPU (simulated needs, GiB: {needs})."
    return suggested, (
        f"Suggested for this {total_gib:.1f} GiB GPU: {suggested} (simulated need {peaks[suggested].card_gib:.1f} GiB; "
        f"all presets, GiB: {needs})."
    )
