"""`LensEngine`: the one owner of the GPU in an app. It holds one `LensPipeline`, a lock, the memory mode, the LoRA
set and the text-feature cache, and turns typed `GenerationRequest`s into saved PNGs with their settings.

The app builds one engine in `main()` and hands it to the tab builders; every change of model, variant, memory mode
or LoRA set goes through an engine method that takes the lock, so two users can never interleave GPU work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from .loading import is_hub_source
from .memory import run_with_oom_guard
from .metadata import ImageSettings, save_png
from .presets import (
    MAX_IMAGE_PIXELS,
    MAX_STEPS,
    PIXELS_PER_TOKEN,
    TINY_MODEL,
    VARIANTS,
    VariantPreset,
    get_variant,
    guidance_is_identity,
)
from .text_cache import TextFeatureCache

logger = logging.getLogger(__name__)

# Limits the engine accepts. Lens generalises up to the 1440 area (2080 px on the long side); a little more is allowed.
MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 2560
MAX_GUIDANCE = 30.0
MAX_BATCH_COUNT = 16
MAX_BATCH_SIZE = 8
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
MAX_NEGATIVE_PROMPT_CHARS = MAX_PROMPT_CHARS
IMAGES_SUBDIR = "images"


class GenerationCancelled(Exception):
    """The job's cancel event was set. Batches that finished before it are saved: `saved` lists their files, and
    the message says how many of the job's images that is."""

    def __init__(self, message: str, saved: list[Path] | None = None):
        super().__init__(message)
        self.saved = list(saved or [])


class EngineNotReady(RuntimeError):
    """No model is loaded (still loading, or loading failed); the message says why and what to do."""


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}.")


@dataclass
class GenerationRequest:
    """One Generate click: what to draw and how. Validated on creation; nothing is corrected silently.

    `num_inference_steps` / `guidance_scale` None mean "the variant's default" (recorded as numbers in the saved
    settings). `seed` None means a random seed, drawn once and then shown and saved. Image i of the job uses seed + i.
    `loras` None means "the engine's active LoRA set" (what the Generate tab shows, e.g. a LoRA the Train tab just
    loaded); a list, even an empty one, sets exactly those LoRAs, and they stay active for the next requests.
    """

    prompt: str
    negative_prompt: str = ""
    variant: str = "Lens-Turbo"
    width: int = 1024
    height: int = 1024
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    batch_count: int = 1  # batches run one after another
    batch_size: int = 1  # images denoised together in one batch
    loras: list[tuple[str, float]] | None = None  # (name under the LoRA folders, weight); None: keep the active set
    original_prompt: str | None = None  # the user's text before the prompt rewriter, if it was used
    preview_every: int = 0  # steps between latent previews; 0 = none

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("The prompt is empty: describe the image you want.")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"The prompt has {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text, got {self.negative_prompt!r}.")
        if len(self.negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
            raise ValueError(
                f"The negative prompt has {len(self.negative_prompt)} characters; the limit is "
                f"{MAX_NEGATIVE_PROMPT_CHARS}."
            )
        self.variant = get_variant(str(self.variant)).name
        for name, value in (("width", self.width), ("height", self.height)):
            _check_int(name, value, MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)
            if value % PIXELS_PER_TOKEN:
                raise ValueError(f"{name} must be a multiple of {PIXELS_PER_TOKEN} pixels, got {value}.")
        if self.width * self.height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{self.width}x{self.height} is {self.width * self.height} pixels; the limit is {MAX_IMAGE_PIXELS} "
                "(1536x1536)."
            )
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        if self.guidance_scale is not None:
            g = self.guidance_scale
            if (
                isinstance(g, bool)
                or not isinstance(g, (int, float))
                or not math.isfinite(g)
                or not 0 <= g <= MAX_GUIDANCE
            ):
                raise ValueError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE}, got {g!r}.")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("batch_count", self.batch_count, 1, MAX_BATCH_COUNT)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.seed is not None and self.seed + self.total_images - 1 > MAX_SEED:
            # Image i uses seed + i: past MAX_SEED a saved seed would not reproduce its image.
            raise ValueError(
                f"seed {self.seed} with {self.total_images} images would need seeds up to "
                f"{self.seed + self.total_images - 1}; the largest seed is {MAX_SEED}, so for this job the seed "
                f"can be at most {MAX_SEED - self.total_images + 1}."
            )
        _check_int("preview_every", self.preview_every, 0, MAX_STEPS)
        if self.loras is not None and not isinstance(self.loras, (list, tuple)):
            raise ValueError(f"loras must be a list of (name, weight) pairs or None, got {self.loras!r}.")
        for item in self.loras or []:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"Each LoRA must be (name, weight), got {item!r}.")
            weight = item[1]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -4 <= weight <= 4:
                raise ValueError(f"LoRA weight for {item[0]!r} must be a number from -4 to 4, got {weight!r}.")

    @property
    def total_images(self) -> int:
        return self.batch_count * self.batch_size

    @classmethod
    def from_image_settings(cls, settings: ImageSettings) -> GenerationRequest:
        """The one-image request that reproduces `settings` (restored from a PNG), checked by the same rules as
        every request; raises ValueError naming the first value `/generate` would refuse."""
        return cls(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            variant=settings.variant or "Lens",
            width=settings.width,
            height=settings.height,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            seed=settings.seed,
        )


@dataclass
class GenerationResult:
    """What one job produced: saved files and, for each, the settings that reproduce it."""

    paths: list[Path]
    settings: list[ImageSettings]
    seed: int  # the first image's seed; image i used seed + i
    elapsed_s: float


@dataclass
class ProgressEvent:
    """Reported after every denoising step of a job (`preview` only every `preview_every` steps)."""

    step: int  # steps done in the whole job, 1..total_steps
    total_steps: int
    batch_index: int
    elapsed_s: float
    preview: object | None = None  # PIL image

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.step * (self.total_steps - self.step) if self.step else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Latent preview and file names (pure functions)
# ---------------------------------------------------------------------------------------------------------------------


def _preview_projection(channels: int) -> torch.Tensor:
    # A fixed random channels -> 3 projection (seeded, so every preview uses the same colours). It is not the VAE: it
    # shows the layout emerging at 1/16 resolution, with false colours, for the cost of one small matmul.
    generator = torch.Generator().manual_seed(20260523)
    return torch.randn(channels, 3, generator=generator) / math.sqrt(channels)


def latent_preview(tokens: torch.Tensor, height_tokens: int, width_tokens: int, size: int = 256):
    """Packed latents [B, h*w, C] -> a PIL preview of the first image (nearest-upscaled to about `size` px)."""
    from PIL import Image

    # Project on the latents' device, then move only [h*w, 3] to the CPU.
    rgb = (tokens[0].float() @ _preview_projection(tokens.shape[-1]).to(tokens.device)).cpu()  # [h*w, 3]
    # Stretch mean +- 2 std to 0..1 (cheaper than percentiles; the absolute scale changes over the steps).
    rgb = ((rgb - rgb.mean()) / (4 * rgb.std()).clamp_min(1e-6) + 0.5).clamp(0, 1)
    pixels = (rgb.reshape(height_tokens, width_tokens, 3) * 255).to(torch.uint8).numpy()  # [h, w, 3]
    scale = max(1, size // max(height_tokens, width_tokens))
    return Image.fromarray(pixels).resize((width_tokens * scale, height_tokens * scale), Image.NEAREST)


def safe_image_path(output_dir: Path, stem: str) -> Path:
    """`output_dir/images/<stem>.png` with `stem` reduced to [a-z0-9-_]; raises if the result would leave the folder.

    `output_dir` is the app's output folder or, on a shared server, the caller's workspace."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")[:80] or "image"
    folder = (Path(output_dir) / IMAGES_SUBDIR).resolve()
    path = (folder / f"{cleaned}.png").resolve()
    if path.parent != folder:
        raise ValueError(f"Refusing to write {path}: outside the output folder {folder}.")
    return path


def public_model_name(model: str) -> str:
    """How a model is named to the people who see its images (banner, PNG settings): a Hub id or "tiny" as it is, a
    local folder or single file by its own name only, so a hosted app never shows where the server keeps its weights."""
    if model == TINY_MODEL or is_hub_source(model):
        return model
    return Path(model).name or model


def estimate_gpu_seconds(num_inference_steps: int, width: int, height: int, images: int, guidance_scale: float) -> int:
    """A generous GPU-time estimate for ZeroGPU's `duration`: the published 3.15 s for 20 steps at 1024x1024 with
    guidance on an H100 (about 0.16 s per step per megapixel), doubled for slower cards, plus load and decode time."""
    megapixels = width * height / 2**20
    per_step = 0.16 * megapixels * (0.5 if guidance_is_identity(guidance_scale) else 1.0)  # 1: no unconditional pass
    return int(min(300, 15 + 2 * per_step * num_inference_steps * images + 2 * images))


def list_loras(output_dir: Path, workspace: Path | None = None) -> dict[str, Path]:
    """LoRAs the app offers, by name (the name is what requests carry, so an API caller cannot point at other files):
    any `*.safetensors` under `<output_dir>/loras/` (ours, ComfyUI or kohya files; the server's, offered to everyone)
    as `loras/...`, and the finished LoRAs of training runs under `<workspace>/training/` (diffusers keys; their
    exports are the same weights) as `training/...`. `workspace` defaults to `output_dir`; on a shared server it is
    the caller's own folder, so one visitor never sees another's runs."""
    from .lora import list_loras as list_lora_files

    root, workspace = Path(output_dir), Path(workspace if workspace is not None else output_dir)
    offered = {path.relative_to(root).as_posix(): path for path in sorted(root.glob("loras/**/*.safetensors"))}
    for info in sorted(list_lora_files(workspace / "training", key_format="diffusers"), key=lambda info: info.path):
        offered[info.path.relative_to(workspace).as_posix()] = info.path
    return offered


# ---------------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EngineConfig:
    """How the engine finds and places its model. Every field is a command-line option of the app."""

    output_dir: Path
    model: str = VARIANTS["Lens-Turbo"].repo_ids[0]  # Hub id (mirrors tried in order), local folder, or "tiny"
    memory_mode: str = "auto"  # a key of lens_core.memory.MEMORY_MODES, or "auto"
    device: str | None = None  # default: cuda if available, else cpu
    torch_dtype: torch.dtype | None = None  # default: bfloat16 on CUDA, float32 on CPU
    local_files_only: bool = False  # never contact the Hub


MISSING_MODEL_HELP = (
    "How to get the weights: run once with network access (the app downloads {repo} or a mirror into the Hugging Face "
    "cache), or download a Lens folder yourself and start with `--model /path/to/folder`. Until then, the tiny random "
    "demo model shows every feature (its images are noise)."
)


class LensEngine:
    """Owns one `LensPipeline` and serialises all GPU work behind one lock."""

    def __init__(self, config: EngineConfig, text_feature_cache: TextFeatureCache | None = None):
        self.config = config
        # Attached to every loaded pipeline: changing seed, steps or size never runs the 20 B encoder again.
        self.text_feature_cache = TextFeatureCache() if text_feature_cache is None else text_feature_cache
        self.lock = threading.RLock()
        self.pipe = None
        self.model_label = config.model
        self.status = "not loaded"  # "loading", "ready" or "error"
        self.load_error: str | None = None
        self.loras: list[
            tuple[str, float]
        ] = []  # the LoRAs loaded in the pipeline now (names as their caller named them)
        # What is loaded: (file, its mtime, weight). Names differ per workspace, files do not; the mtime makes a file
        # written again (a run trained again under the same name) load again.
        self._lora_files: list[tuple[Path, int, float]] = []
        # Per workspace, the set its requests with `loras=None` use: one visitor's choice never reaches another's images.
        self._active_loras: dict[Path, list[tuple[str, float]]] = {}
        self._file_counter = 0
        self._local_rewriter = None  # LocalGptOssRewriter, loaded on first use

    # ---- model ---------------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def busy(self) -> bool:
        """Whether another thread holds the engine (generating, loading or rewriting)."""
        if self.lock.acquire(blocking=False):
            self.lock.release()
            return False
        return True

    @property
    def is_demo(self) -> bool:
        return self.model_label == TINY_MODEL

    @property
    def variant(self) -> VariantPreset:
        return self.pipe.variant_preset if self.pipe is not None else get_variant("Lens-Turbo")

    @property
    def device(self) -> str:
        return self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def public_model_name(self) -> str:
        return public_model_name(self.model_label)

    def status_text(self, for_visitors: bool = False) -> str:
        """One Markdown paragraph for the page: what is loaded, or what is missing and how to fix it. `for_visitors`
        (a shared server) leaves out the load error, which names server folders and files: the server log has it."""
        name = self.public_model_name
        if self.status == "ready":
            demo = " (random demo weights: images are noise)" if self.is_demo else ""
            return f"Model **{name}** ({self.variant.name}) ready on {self.device}{demo}."
        if self.status == "loading":
            return f"Loading **{name}**... (the first start downloads about 30 GB)."
        if self.status == "error":
            if for_visitors:
                return f"**No model loaded.** The server could not load `{name}`; its log says why."
            return f"**No model loaded.** {self.load_error}"
        return "No model loaded yet."

    def load(self, model: str | None = None, variant: str | None = None) -> None:
        """Load `model` (default: the configured one) under the lock. On failure the engine keeps serving with
        `status == "error"` and `load_error` explaining what is missing; the error is also raised."""
        from .loading import CheckpointError

        model = model or self.config.model
        with self.lock:
            self.status, self.model_label = "loading", model
            try:
                pipe = self._load_pipeline(model, variant)
            except (CheckpointError, OSError, ValueError) as error:
                self._set_failed(model, error)
                raise
            self._release_pipe()
            self.pipe, self.status, self.load_error, self.loras, self._lora_files = pipe, "ready", None, [], []
            logger.info("Loaded %s (%s) with memory mode %s", model, pipe.variant_preset.name, pipe.memory_mode)

    def _set_failed(self, model: str, error: Exception) -> None:
        repo = model if is_hub_source(model) else VARIANTS["Lens-Turbo"].repo_ids[0]
        self.status = "error" if self.pipe is None else "ready"
        self.load_error = f"Could not load `{model}`: {error}\n\n" + MISSING_MODEL_HELP.format(repo=repo)
        if self.pipe is not None:  # the previous model still serves
            self.model_label = getattr(self.pipe, "lens_model_label", self.model_label)
        logger.error("Could not load %s: %s", model, error)

    def load_in_background(self) -> threading.Thread:
        """Start `load()` in a thread so the page can open (and explain) while weights load or fail."""
        self.status = "loading"

        def run() -> None:
            # A failure is already recorded in status / load_error for the page.
            with contextlib.suppress(Exception):
                self.load()

        thread = threading.Thread(target=run, name="lens-engine-load", daemon=True)
        thread.start()
        return thread

    def _load_pipeline(self, model: str, variant: str | None):
        from .memory import apply_memory_mode
        from .pipeline_lens import LensPipeline

        dtype = self.config.torch_dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        # The loader resolves "tiny", Hub ids with their mirrors, and the variant a known repo id implies.
        pipe = self._from_pretrained(LensPipeline, model, dtype, variant)
        pipe.lens_model_label = model
        pipe.text_feature_cache = self.text_feature_cache
        return apply_memory_mode(pipe, self.config.memory_mode, device=self.device)

    def _from_pretrained(self, pipeline_class, source, dtype, variant):
        # The Hub cache first, so an offline start fails in milliseconds instead of waiting on the network.
        kwargs = {"torch_dtype": dtype, "variant_name": variant}
        if Path(str(source)).exists() or self.config.local_files_only:
            return pipeline_class.from_pretrained(source, local_files_only=self.config.local_files_only, **kwargs)
        try:
            return pipeline_class.from_pretrained(source, local_files_only=True, **kwargs)
        except ValueError:
            logger.info("%s is not in the local cache; trying the Hub and its mirrors.", source)
            return pipeline_class.from_pretrained(source, local_files_only=False, **kwargs)

    def _release_pipe(self) -> None:
        self.pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _require_pipe(self):
        if self.pipe is None:
            raise EngineNotReady(self.status_text())
        return self.pipe

    def set_variant(self, variant: str, allow_reload: bool = True) -> VariantPreset:
        """Use `variant`'s presets; for a Hub model of another variant, load that variant's checkpoint (same lock).

        A local folder or the tiny model has one checkpoint, so only the presets change there. Loading another
        checkpoint changes the model for every user; with `allow_reload=False` (a shared server's visitor) that is
        refused with a ValueError instead."""
        from .presets import variant_for_repo_id

        preset = get_variant(variant)
        with self.lock:
            pipe = self._require_pipe()
            if pipe.variant_preset.name == preset.name:
                return preset
            if variant_for_repo_id(self.model_label) is not None:
                if not allow_reload:
                    current = pipe.variant_preset.name
                    raise ValueError(
                        f"This server runs {current}; {preset.name} is another checkpoint, and loading it would "
                        f"change the model for everyone, which only an admin can do. Choose variant {current}."
                    )
                self.load(preset.repo_ids[0], preset.name)
            else:
                pipe.variant_preset = preset
        return preset

    def set_memory_mode(self, mode: str) -> str:
        """Reload the pipeline in memory mode `mode` (a key of MEMORY_MODES, or "auto")."""
        from .memory import AUTO, MEMORY_MODES

        with self.lock:
            pipe = self._require_pipe()
            if mode not in (AUTO, *MEMORY_MODES):
                raise ValueError(f"Unknown memory mode {mode!r}; choose one of {[AUTO, *MEMORY_MODES]}.")
            previous = self.config.memory_mode
            self.config.memory_mode = mode
            # Quantization and offload hooks cannot be undone in place, so the pipeline is loaded again in the new
            # mode; on failure the previous pipeline keeps serving.
            try:
                self.load(getattr(pipe, "lens_model_label", self.model_label), pipe.variant_preset.name)
            except Exception:
                self.config.memory_mode = previous
                raise
            return self.pipe.memory_mode

    def active_loras(self, workspace: Path | None = None) -> list[tuple[str, float]]:
        """The LoRA set `workspace`'s last `set_loras` chose (what its requests with `loras=None` use)."""
        return list(self._active_loras.get(self._workspace_key(workspace), []))

    def _workspace_key(self, workspace: Path | None) -> Path:
        return Path(workspace if workspace is not None else self.config.output_dir).resolve()

    def set_loras(self, loras: list[tuple[str, float]], workspace: Path | None = None) -> None:
        """Activate exactly these LoRAs for `workspace`: (name from `list_loras(output_dir, workspace)`, weight). An
        empty list removes all. They stay `workspace`'s active set until it sets another."""
        with self.lock:
            pipe = self._require_pipe()
            if not loras and not self._lora_files:  # the common case, on every image: no folder to list
                self.loras = self._active_loras[self._workspace_key(workspace)] = []
                return
            available = list_loras(self.config.output_dir, workspace)
            # A path to one of the offered files (e.g. from the Train tab) is accepted as its name.
            by_path = {path.resolve(): name for name, path in available.items()}
            wanted = [(by_path.get(Path(name).resolve(), name), float(weight)) for name, weight in loras]
            unknown = [name for name, _ in wanted if name not in available]
            if unknown:
                raise ValueError(f"Unknown LoRA {unknown[0]!r}; available: {sorted(available) or 'none'}.")
            files = [(available[name].resolve(), available[name].stat().st_mtime_ns, weight) for name, weight in wanted]
            if files == self._lora_files:
                self.loras = self._active_loras[self._workspace_key(workspace)] = wanted
                return
            missing = [m for m in ("load_lora_weights", "unload_lora_weights") if not hasattr(pipe, m)]
            if missing:
                raise ValueError(f"LoRA support not installed: this LensPipeline has no {', '.join(missing)}.")
            pipe.unload_lora_weights()
            self.loras, self._lora_files = [], []
            adapters = [f"lora_{index}" for index in range(len(wanted))]
            for adapter, (name, weight) in zip(adapters, wanted, strict=True):
                try:
                    pipe.load_lora_weights(available[name], adapter_name=adapter, weight=weight)
                except (ValueError, OSError) as error:  # named as the caller names it: no server path in the message
                    pipe.unload_lora_weights()
                    reason = str(error).replace(str(available[name]), name)
                    raise ValueError(f"The LoRA {name!r} could not be loaded: {reason}") from None
            if adapters and hasattr(pipe, "set_adapters"):
                pipe.set_adapters(adapters, adapter_weights=[weight for _, weight in wanted])
            self.loras, self._lora_files = wanted, files
            self._active_loras[self._workspace_key(workspace)] = wanted

    # ---- generation ----------------------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        cancel_event: threading.Event | None = None,
        *,
        workspace: Path | None = None,
        allow_model_reload: bool = True,
    ) -> GenerationResult:
        """Run `request` under the lock and save every image into `<workspace>/images` (default: the output folder).

        `cancel_event` (the caller's own) stops this job at the next step and raises `GenerationCancelled`; batches
        finished before stay saved and the error counts them. LoRA names resolve in `workspace` (see `list_loras`).
        `allow_model_reload=False` refuses a variant that needs another checkpoint (see `set_variant`)."""
        workspace = Path(workspace if workspace is not None else self.config.output_dir)
        with self.lock:
            self._require_pipe()
            if cancel_event is not None and cancel_event.is_set():
                raise GenerationCancelled("Cancelled before it started; nothing was saved.")
            preset = self.set_variant(request.variant, allow_reload=allow_model_reload)
            # None: the caller's active set stays (e.g. a LoRA the Train tab loaded), until the caller changes it.
            loras = self.active_loras(workspace) if request.loras is None else list(request.loras)
            self.set_loras(loras, workspace)
            steps = request.num_inference_steps or preset.num_inference_steps
            guidance = preset.guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
            seed = random.randrange(MAX_SEED - request.total_images) if request.seed is None else request.seed
            start = time.monotonic()
            paths, settings = [], []
            for batch in range(request.batch_count):
                seeds = [seed + batch * request.batch_size + i for i in range(request.batch_size)]
                try:
                    images = run_with_oom_guard(
                        lambda seeds=seeds, batch=batch: self._run_batch(
                            request, steps, guidance, seeds, batch, start, on_progress, cancel_event
                        ),
                        self.pipe.memory_mode,
                        request.width,
                        request.height,
                        guidance,
                    )
                except GenerationCancelled:
                    saved = (
                        f"{len(paths)} of {request.total_images} images were saved" if paths else "nothing was saved"
                    )
                    raise GenerationCancelled(
                        f"Cancelled during batch {batch + 1} of {request.batch_count}; {saved}.", paths
                    ) from None
                for image, image_seed in zip(images, seeds, strict=True):
                    setting = self._settings_for(request, steps, guidance, image_seed)
                    paths.append(self._save(image, setting, workspace))
                    settings.append(setting)
            return GenerationResult(paths, settings, seed, time.monotonic() - start)

    def _run_batch(self, request, steps, guidance, seeds, batch, start, on_progress, cancel_event) -> list:
        pipe = self.pipe
        height_tokens, width_tokens = request.height // pipe.pixels_per_token, request.width // pipe.pixels_per_token
        total_steps = steps * request.batch_count

        def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
            done = batch * steps + step + 1
            preview = None
            if request.preview_every and (step + 1) % request.preview_every == 0 and step + 1 < steps:
                preview = latent_preview(tensors["latents"], height_tokens, width_tokens)
            if on_progress is not None:
                on_progress(ProgressEvent(done, total_steps, batch, time.monotonic() - start, preview))
            if cancel_event is not None and cancel_event.is_set():
                pipe._interrupt = True  # the pipeline checks this before the next step
            return {}

        # CPU generators: a seed gives the same noise on any device, and each image has its own generator, so image
        # k of a batch equals a single image generated with its seed.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=request.batch_size,
            generator=generators,
            callback_on_step_end=on_step,
        )
        if cancel_event is not None and cancel_event.is_set():
            raise GenerationCancelled("Cancelled.")  # the caller says which batch and what was saved
        return output.images

    def _settings_for(self, request: GenerationRequest, steps: int, guidance: float, seed: int) -> ImageSettings:
        return ImageSettings(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=request.width,
            height=request.height,
            variant=self.pipe.variant_preset.name,
            model=self.public_model_name,
            prompt_date=self.pipe.prompt_date,
            original_prompt=request.original_prompt,
            loras=[{"name": name, "weight": weight} for name, weight in self.loras],
            memory_mode=getattr(self.pipe, "memory_mode", None),
        )

    def _save(self, image, settings: ImageSettings, workspace: Path) -> Path:
        # Called under the lock, so the counter makes names unique even within one second.
        self._file_counter += 1
        words = "-".join(re.findall(r"[a-z0-9]+", settings.prompt.lower())[:6])
        stem = f"{datetime.now():%Y%m%d-%H%M%S}-{self._file_counter:04d}-{settings.seed}-{words}"
        path = safe_image_path(workspace, stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        while path.exists():  # another app process writing to the same folder
            self._file_counter += 1
            path = safe_image_path(workspace, f"{stem}-{self._file_counter}")
        return save_png(image, path, settings)

    # ---- prompt rewriting ----------------------------------------------------------------------------------------

    def rewrite_prompt(self, prompt: str, settings) -> str:
        """Rewrite `prompt` with `settings` (a `lens_core.rewriter.RewriterSettings`). The local backend runs the
        checkpoint's GPT-OSS under the engine lock (it shares the GPU); an HTTP endpoint needs no lock."""
        from .rewriter import LocalGptOssRewriter, OpenAICompatibleRewriter

        if settings.backend == "openai":
            return OpenAICompatibleRewriter(settings).rewrite(prompt)
        with self.lock:
            pipe = self._require_pipe()
            folder = Path(pipe.checkpoint_folder)
            cached = self._local_rewriter
            if cached is None or cached.folder != folder:
                cached = LocalGptOssRewriter(folder, settings, device=self.device)
                self._local_rewriter = cached
            cached.settings = settings
            return cached.rewrite(prompt)
