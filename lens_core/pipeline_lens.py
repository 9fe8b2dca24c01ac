"""`LensPipeline`: text -> image with Lens, numerically identical to the official pipeline (LENS_SPEC sections 3-5).

`__call__` runs in a fixed order: 1. check inputs, 2. encode the prompt, 3. prepare latents, 4. timesteps,
5. denoise, 6. decode. Every shape comes from the components' configs (`transformer.config.in_channels`, the VAE's
`latent_channels` and `patch_size`), so a checkpoint in the Lens layout with other channel counts runs unchanged.

Where it knowingly differs from the official pipeline, a switch restores the official behaviour (README, "What Lens
is"): `prompt_truncation = "text"`, `strip_control_markers = False`, `prompt_date = <today>`,
`keep_latents_float32 = False`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .latents import LatentLayout, decode_tokens
from .lora import LensLoraLoaderMixin
from .presets import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_PROMPT_DATE,
    DEFAULT_PROMPT_TRUNCATION,
    VARIANTS,
    VariantPreset,
    compute_mu,
    guidance_is_identity,
    resolve_size,
)
from .prompt import TokenizedPrompts, tokenize_prompts

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# model_index.json entries as the official ones read (LENS_SPEC section 1), for what diffusers would otherwise record:
# our module paths for our classes, and transformers 5's name for the class PreTrainedTokenizerFast now aliases.
OFFICIAL_INDEX_ENTRIES = {
    ("lens_core.text_encoder", "LensGptOssEncoder"): ("transformers", "LensGptOssEncoder"),
    ("lens_core.transformer_lens", "LensTransformer2DModel"): ("diffusers", "LensTransformer2DModel"),
    ("transformers", "TokenizersBackend"): ("transformers", "PreTrainedTokenizerFast"),
}


@dataclass
class LensPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, an array [B, H, W, 3] in 0..1, a tensor [B, 3, H, W] in 0..1, or packed latents
    [B, h*w, in_channels] for `output_type="latent"`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class PromptFeatures:
    """Encoder output for a batch: one [B, S, hidden] tensor per selected layer and a [B, S] bool mask."""

    embeds: list[torch.Tensor]
    mask: torch.Tensor


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, then rescale each token so its norm over the channels equals the conditional one.

    cond, uncond: [B, L, C] -> [B, L, C] float32.
    """
    cond, uncond = cond.float(), uncond.float()
    combined = uncond + guidance_scale * (cond - uncond)
    cond_norm = torch.linalg.vector_norm(cond, dim=-1, keepdim=True)  # [B, L, 1]
    combined_norm = torch.linalg.vector_norm(combined, dim=-1, keepdim=True)
    ratio = torch.where(combined_norm == 0, torch.ones_like(cond_norm), cond_norm / combined_norm.clamp_min(1e-12))
    return combined * ratio


def is_empty_text(text: str) -> bool:
    """A negative prompt of nothing but whitespace counts as empty, as in the official pipeline."""
    return not text.strip()


def pad_features(features: PromptFeatures, length: int) -> PromptFeatures:
    """Right-pad features with zeros and the mask with False up to `length` tokens."""
    extra = length - features.mask.shape[1]
    if extra <= 0:
        return features
    embeds = [torch.nn.functional.pad(layer, (0, 0, 0, extra)) for layer in features.embeds]
    mask = torch.nn.functional.pad(features.mask, (0, extra), value=False)
    return PromptFeatures(embeds, mask)


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}.")


class LensPipeline(DiffusionPipeline, LensLoraLoaderMixin):
    """Lens text-to-image: GPT-OSS features -> `LensTransformer2DModel` flow matching -> FLUX.2 VAE.

    Load with `LensPipeline.from_pretrained(repo_id_or_folder, torch_dtype=...)`; `save_pretrained(folder)` writes the
    official layout back (model_index.json with the official class names, MXFP4 text encoder).

    Settings (attributes; the defaults are ours, see the README for the official behaviour): `prompt_date`
    (YYYY-MM-DD in the preamble), `prompt_truncation` ("prompt" or "text"), `strip_control_markers`,
    `keep_latents_float32`, `variant_preset` (default steps and guidance), `text_feature_cache`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "prompt_mask",
        "negative_prompt_embeds",
        "negative_prompt_mask",
    ]

    def __init__(self, scheduler, text_encoder, tokenizer, transformer, vae):
        super().__init__()
        self.register_modules(
            scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae
        )
        self.variant_preset: VariantPreset = VARIANTS["Lens"]
        self.prompt_date = DEFAULT_PROMPT_DATE
        self.prompt_truncation = DEFAULT_PROMPT_TRUNCATION
        self.strip_control_markers = True
        self.keep_latents_float32 = True
        self.text_feature_cache = None  # optional: lens_core.text_cache.TextFeatureCache
        self._interrupt = False
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self.check_components()

    def register_modules(self, **kwargs) -> None:
        """diffusers' registration, with the official entries in the config (and so in the saved model_index.json):
        ("transformers", "LensGptOssEncoder"), ("diffusers", "LensTransformer2DModel"),
        ("transformers", "PreTrainedTokenizerFast")."""
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            if module is not None:
                entry = _fetch_class_library_tuple(module)
                if entry in OFFICIAL_INDEX_ENTRIES:
                    self.register_to_config(**{name: OFFICIAL_INDEX_ENTRIES[entry]})

    def check_components(self) -> None:
        """Raise a ValueError when the components do not fit together (latent channels, patch, text layers)."""
        if self.vae is not None and self.transformer is not None:
            LatentLayout.from_vae(self.vae).check_transformer(self.transformer.config)
        if self.text_encoder is not None and self.transformer is not None:
            encoder_layers = tuple(getattr(self.text_encoder, "selected_layers", self.selected_layers))
            hidden = int(getattr(self.text_encoder.config, "hidden_size", self.text_hidden_dim))
            if encoder_layers != self.selected_layers or hidden != self.text_hidden_dim:
                raise ValueError(
                    f"The text encoder gives layers {list(encoder_layers)} of width {hidden}; the denoiser expects "
                    f"layers {list(self.selected_layers)} (selected_layer_index) of width {self.text_hidden_dim}."
                )

    # -------------------------------------------------------------------------------------------------------------
    # Loading and saving
    # -------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> LensPipeline:
        """Load from a Hub repo id (with mirror fallbacks) or a local folder in the official diffusers layout.

        diffusers' keywords: `torch_dtype` / `dtype` (one dtype, or a dict per component with a "default"; the
        official weights are float32 and are cast), `variant`, `revision`, `cache_dir`, `token`, `force_download`,
        `local_files_only`, `use_safetensors`, `low_cpu_mem_usage`, `device_map` (one device, or a dict per
        component) and components passed in (`transformer=...`). Ours: `transformer_file` (a Comfy-Org single-file
        denoiser instead of `transformer/`), `variant_name` (whose presets apply; guessed from the repo id),
        `prompt_date`, `memory_mode` and `device` (see `lens_core.memory.apply_memory_mode`). Anything else is
        refused with the reason (`lens_core.loading.load_pipeline`).
        """
        from .loading import load_pipeline

        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write the official folder layout: model_index.json (`LensPipeline`, official class and library names) and
        one folder per component, the text encoder with its MXFP4 expert bytes. The folder appears complete or not
        at all: it is built beside the target and moved into place."""
        if push_to_hub or not safe_serialization or kwargs:
            raise ValueError(
                "LensPipeline.save_pretrained writes safetensors to a folder: push_to_hub=True, "
                f"safe_serialization=False and other keywords {sorted(kwargs)} are not supported (upload the saved "
                "folder with huggingface_hub.upload_folder)."
            )
        missing = [
            name
            for name in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
            if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(f"Cannot save a Lens pipeline without its {missing} (was it freed for training?).")
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(staging, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
            _replace_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -------------------------------------------------------------------------------------------------------------
    # Properties
    # -------------------------------------------------------------------------------------------------------------

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the unconditional pass runs: at every guidance scale except exactly 1."""
        return not guidance_is_identity(self._guidance_scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def selected_layers(self) -> tuple[int, ...]:
        return tuple(self.transformer.config.selected_layer_index)

    @property
    def text_hidden_dim(self) -> int:
        return int(self.transformer.config.enc_hidden_dim)

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.transformer.time_text_embed.timestep_embedder.linear_1.weight.dtype

    @property
    def latent_layout(self) -> LatentLayout:
        """VAE channels, patch and downsampling, from the VAE's config."""
        return LatentLayout.from_vae(self.vae)

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per token side (16 for Lens); height and width must be multiples of it."""
        return self.latent_layout.pixels_per_token

    # -------------------------------------------------------------------------------------------------------------
    # Text
    # -------------------------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> TokenizedPrompts:
        """Rendered and tokenized prompts, with this pipeline's date, truncation and marker settings."""
        return tokenize_prompts(
            self.tokenizer,
            texts,
            self.prompt_date,
            max_sequence_length,
            truncation=self.prompt_truncation,
            strip_control_markers=self.strip_control_markers,
        )

    @torch.no_grad()
    def _encode_texts(self, texts: list[str], max_sequence_length: int, device) -> PromptFeatures:
        """Run the encoder on rendered texts and drop the preamble tokens (they were context only)."""
        if self.text_feature_cache is not None:
            return self.text_feature_cache.encode(self, texts, max_sequence_length, device)
        return self._run_text_encoder(texts, max_sequence_length, device)

    @torch.no_grad()
    def _run_text_encoder(self, texts: list[str], max_sequence_length: int, device) -> PromptFeatures:
        if self.text_encoder is None:
            raise ValueError("This pipeline has no text encoder (freed?): pass prompt_embeds and prompt_mask instead.")
        tokens = self.tokenize(texts, max_sequence_length)
        encoder_device = self.text_encoder.device if hasattr(self.text_encoder, "device") else device
        layers = self.text_encoder(
            tokens.input_ids.to(encoder_device), attention_mask=tokens.attention_mask.to(encoder_device)
        )
        start = tokens.prefix_length
        embeds = [layer[:, start:].to(device) for layer in layers]  # each [B, S - prefix, hidden]
        mask = tokens.attention_mask[:, start:].to(device=device, dtype=torch.bool)  # [B, S - prefix]
        return PromptFeatures(embeds, mask)

    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        num_images_per_prompt: int = 1,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        device: torch.device | None = None,
        do_classifier_free_guidance: bool = True,
        prompt_embeds: list[torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
    ):
        """Text features for the prompts and the negatives.

        Returns (prompt_embeds: list of [B*n, S, hidden], prompt_mask [B*n, S] bool, negative_prompt_embeds,
        negative_prompt_mask); the negatives are None when `do_classifier_free_guidance` is False. When every
        negative is empty or whitespace: all-zero features of the positive's shape with an all-False mask (no text
        keys at all). Otherwise positive and negative are right-padded to one length.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            positive = self._encode_texts(_as_list(prompt, "prompt"), max_sequence_length, device)
        else:
            self._check_embeds(prompt_embeds, prompt_mask, "prompt_embeds")
            positive = PromptFeatures(
                [t.to(device) for t in prompt_embeds], self._default_mask(prompt_embeds, prompt_mask).to(device)
            )
        positive = self._repeat(positive, num_images_per_prompt)
        if not do_classifier_free_guidance:
            return positive.embeds, positive.mask, None, None

        batch = positive.mask.shape[0] // num_images_per_prompt
        if negative_prompt_embeds is not None:
            self._check_embeds(negative_prompt_embeds, negative_prompt_mask, "negative_prompt_embeds")
            mask = self._default_mask(negative_prompt_embeds, negative_prompt_mask)
            negative = PromptFeatures([t.to(device) for t in negative_prompt_embeds], mask.to(device))
            if negative.mask.shape[0] != batch:
                raise ValueError(
                    f"negative_prompt_embeds has batch {negative.mask.shape[0]}, the prompts have {batch}."
                )
            negative = self._repeat(negative, num_images_per_prompt)
        else:
            negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * batch
            if len(negatives) != batch:
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but there are {batch} prompts; give one or {batch}."
                )
            if all(is_empty_text(text) for text in negatives):
                zeros = [torch.zeros_like(t) for t in positive.embeds]
                return positive.embeds, positive.mask, zeros, torch.zeros_like(positive.mask)
            negative = self._repeat(self._encode_texts(negatives, max_sequence_length, device), num_images_per_prompt)
        length = max(positive.mask.shape[1], negative.mask.shape[1])
        positive, negative = pad_features(positive, length), pad_features(negative, length)
        return positive.embeds, positive.mask, negative.embeds, negative.mask

    @staticmethod
    def _repeat(features: PromptFeatures, times: int) -> PromptFeatures:
        # p0, p0, p1, p1: each prompt's features repeated in place.
        if times == 1:
            return features
        return PromptFeatures(
            [t.repeat_interleave(times, dim=0) for t in features.embeds], features.mask.repeat_interleave(times, dim=0)
        )

    @staticmethod
    def _default_mask(embeds: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones(embeds[0].shape[:2], dtype=torch.bool, device=embeds[0].device)
        return mask.to(torch.bool)

    def _check_embeds(self, embeds, mask, name: str) -> None:
        layers, width = len(self.selected_layers), self.text_hidden_dim
        if not isinstance(embeds, (list, tuple)) or len(embeds) != layers:
            count = len(embeds) if isinstance(embeds, (list, tuple)) else type(embeds).__name__
            raise ValueError(
                f"{name} must be a list of {layers} tensors (one per encoder layer {list(self.selected_layers)}), got {count}."
            )
        shape = embeds[0].shape
        for tensor in embeds:
            if (
                not isinstance(tensor, torch.Tensor)
                or tensor.ndim != 3
                or tensor.shape[-1] != width
                or tensor.shape != shape
            ):
                raise ValueError(
                    f"each tensor of {name} must be [B, S, {width}] with one shared shape, got {[tuple(getattr(t, 'shape', ())) for t in embeds]}."
                )
        if mask is not None and tuple(mask.shape) != tuple(shape[:2]):
            raise ValueError(f"the mask for {name} must be [B, S] = {tuple(shape[:2])}, got {tuple(mask.shape)}.")

    # -------------------------------------------------------------------------------------------------------------
    # Checks and preparation
    # -------------------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        output_type,
        max_sequence_length,
        callback_on_step_end_tensor_inputs=None,
    ) -> None:
        """Reject bad arguments with a message naming the value and what is allowed (nothing is corrected)."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give either `prompt` or `prompt_embeds` (with `prompt_mask`); both are missing.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Give either `prompt` or `prompt_embeds`, not both.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}.")
        if negative_prompt_embeds is not None:
            self._check_embeds(negative_prompt_embeds, None, "negative_prompt_embeds")
        unknown = [
            name for name in callback_on_step_end_tensor_inputs or () if name not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from {self._callback_tensor_inputs}."
            )

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator, latents, device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Standard normal noise drawn directly in token layout [B, h*w, in_channels], in `dtype` (float32)."""
        pixels = self.pixels_per_token
        shape = (batch_size, (height // pixels) * (width // pixels), int(self.transformer.config.in_channels))
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents must be packed tokens of shape {shape} for {width}x{height}, got {tuple(latents.shape)}."
                )
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for a batch of {batch_size} images; give one or {batch_size}."
            )
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int, device) -> torch.Tensor:
        """Shifted sigmas from linspace(1, 1/N, N) with the exponential time shift at mu(L, N); a final 0 appended."""
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=np.float32)
        mu = compute_mu(image_seq_len, num_inference_steps)
        # mu falls linearly with the step count: past about 13,000 steps exp(mu) underflows in the float32 shift and
        # the first shifted sigma is 0 / 0. Check the shift the scheduler will make (on the host, in its dtypes) and
        # say so, instead of failing inside the scheduler.
        with np.errstate(divide="ignore", invalid="ignore"):
            shifted = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        if not np.isfinite(shifted).all():
            raise ValueError(
                f"num_inference_steps={num_inference_steps} gives no usable schedule at {image_seq_len} image tokens "
                f"(shift mu = {mu:.1f}); use fewer steps (Lens-Base's default is 50)."
            )
        self.scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=mu, device=device)
        return self.scheduler.timesteps

    # -------------------------------------------------------------------------------------------------------------
    # Generation
    # -------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        height: int | None = None,
        width: int | None = None,
        base_resolution: int | None = None,
        aspect_ratio: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        """Generate images. Missing steps / guidance come from the loaded variant's presets (Lens 20 / 5.0,
        Lens-Turbo 4 / 1.0, Lens-Base 50 / 5.0); the size from `height`/`width` or `base_resolution`/`aspect_ratio`
        (default 1024, 1:1). Guidance combines and rescales at every scale, as the official pipeline does, except at
        exactly 1, where the combination is the conditional prediction and the unconditional pass is skipped.

        `callback_on_step_end(pipe, step, timestep, tensors)` runs after every step with the tensors named in
        `callback_on_step_end_tensor_inputs` (default ["latents"]; any of `_callback_tensor_inputs`); it may return
        some of them to replace them, and may set `pipe._interrupt = True` to stop early."""
        # 1. Check inputs.
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = (
            ["latents"] if callback_on_step_end_tensor_inputs is None else list(callback_on_step_end_tensor_inputs)
        )
        steps = self.variant_preset.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.variant_preset.guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(
            prompt,
            prompt_embeds,
            negative_prompt_embeds,
            steps,
            guidance,
            num_images_per_prompt,
            output_type,
            max_sequence_length,
            tensor_inputs,
        )
        height, width = resolve_size(height, width, base_resolution, aspect_ratio, multiple=self.pixels_per_token)
        height_tokens, width_tokens = height // self.pixels_per_token, width // self.pixels_per_token
        device = self._execution_device
        self._guidance_scale, self._interrupt = guidance, False
        do_cfg = self.do_classifier_free_guidance

        # 2. Encode the prompt (or take the given features), in the model dtype on the device.
        dtype = self.transformer_dtype
        features = self.encode_prompt(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            max_sequence_length,
            device,
            do_cfg,
            prompt_embeds,
            prompt_mask,
            negative_prompt_embeds,
            negative_prompt_mask,
        )
        text = {
            name: None
            if value is None
            else ([t.to(device=device, dtype=dtype) for t in value] if isinstance(value, list) else value.to(device))
            for name, value in zip(
                ("prompt_embeds", "prompt_mask", "negative_prompt_embeds", "negative_prompt_mask"), features
            )
        }
        batch_size = text["prompt_mask"].shape[0]

        # 3. Latents, float32 tokens (or the model dtype with keep_latents_float32 = False). [B, h*w, in_channels]
        latents_dtype = torch.float32 if self.keep_latents_float32 else dtype
        latents = self.prepare_latents(batch_size, height, width, generator, latents, device, latents_dtype)

        # 4. Timesteps.
        timesteps = self.prepare_timesteps(steps, height_tokens * width_tokens, device)
        self._num_timesteps = len(timesteps)

        # 5. Denoise.
        embeds, mask = self._model_text_inputs(text, do_cfg)
        img_shapes = [(1, height_tokens, width_tokens)] * mask.shape[0]
        with self.progress_bar(total=len(timesteps)) as progress:
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                # The model gets t / 1000 with t first cast to the model dtype (in bf16 this quantizes it).
                timestep = (t.to(dtype) / 1000).expand(model_input.shape[0])
                velocity = self.transformer(
                    hidden_states=model_input.to(dtype),
                    encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=mask,
                    timestep=timestep,
                    img_shapes=img_shapes,
                    return_dict=False,
                )[0]
                if do_cfg:
                    cond, uncond = velocity.chunk(2)
                    velocity = guided_velocity(cond, uncond, guidance)
                # Euler step, computed in float32 by the scheduler, returned in the velocity's dtype.
                latents = self.scheduler.step(velocity.to(latents_dtype), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, **text}
                    outputs = callback_on_step_end(self, step, t, {name: tensors[name] for name in tensor_inputs}) or {}
                    latents = outputs.pop("latents", latents)
                    if any(name in outputs for name in text):
                        text.update({name: outputs[name] for name in text if name in outputs})
                        embeds, mask = self._model_text_inputs(text, do_cfg)
                progress.update()

        # 6. Decode.
        images = self._postprocess(latents, height_tokens, width_tokens, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LensPipelineOutput(images=images)

    @staticmethod
    def _model_text_inputs(text: dict, do_cfg: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The denoiser's text inputs: the positive features, or one batch [positive; negative] with guidance."""
        if not do_cfg:
            return text["prompt_embeds"], text["prompt_mask"]
        embeds = [torch.cat([p, n]) for p, n in zip(text["prompt_embeds"], text["negative_prompt_embeds"])]
        return embeds, torch.cat([text["prompt_mask"], text["negative_prompt_mask"]])

    def _postprocess(self, latents: torch.Tensor, height_tokens: int, width_tokens: int, output_type: str):
        if output_type == "latent":
            return latents
        images = decode_tokens(self.vae, latents, height_tokens, width_tokens)  # [B, 3, H, W] in [-1, 1]
        if output_type == "pt":
            return (images.float() + 1) / 2
        if output_type == "np":
            return ((images.float() + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        # The official PIL path truncates (x + 1) * 127.5 to uint8.
        pixels = ((images.float() + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [PIL.Image.fromarray(array) for array in pixels]


def _replace_folder(staging: Path, target: Path) -> None:
    """Move a complete `staging` folder to `target`; an existing `target` is swapped out first and removed after."""
    if not target.exists():
        staging.rename(target)
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; choose another save_directory.")
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


__all__ = ["LensPipeline", "LensPipelineOutput", "FlowMatchEulerDiscreteScheduler", "guided_velocity"]
