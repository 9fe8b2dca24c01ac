"""`LensPipeline`: text -> image with Lens, numerically identical to the official pipeline (LENS_SPEC sections 3-5).

`__call__` runs in a fixed order: 1. check inputs, 2. encode the prompt, 3. prepare latents, 4. timesteps,
5. denoise, 6. decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .latents import PACKED_CHANNELS, decode_tokens
from .lora import LensLoraLoaderMixin
from .presets import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_PROMPT_DATE,
    PIXELS_PER_TOKEN,
    VARIANTS,
    VariantPreset,
    compute_mu,
    resolve_size,
)
from .prompt import tokenize_prompts

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LensPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, an array [B, H, W, 3] in 0..1, a tensor [B, 3, H, W] in 0..1, or packed latents
    [B, h*w, 128] for `output_type="latent"`."""

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

    Load with `LensPipeline.from_pretrained(repo_id_or_folder, torch_dtype=...)`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, scheduler, text_encoder, tokenizer, transformer, vae):
        super().__init__()
        self.register_modules(
            scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae
        )
        self.variant_preset: VariantPreset = VARIANTS["Lens"]
        self.prompt_date = DEFAULT_PROMPT_DATE
        self.text_feature_cache = None  # optional: lens_core.text_cache.TextFeatureCache
        self._interrupt = False

    # -------------------------------------------------------------------------------------------------------------
    # Loading
    # -------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> LensPipeline:
        """Load from a Hub repo id (with mirror fallbacks) or a local folder in the official diffusers layout.

        Keyword arguments: `torch_dtype` (official weights are float32; they are cast), `transformer_file` (a
        Comfy-Org single-file denoiser used instead of the folder's `transformer/`), `local_files_only`,
        `variant_name` (which presets apply; guessed from the repo id), `memory_mode` and `device` (see
        `lens_core.memory.apply_memory_mode`).
        """
        from .loading import load_pipeline

        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    # -------------------------------------------------------------------------------------------------------------
    # Properties
    # -------------------------------------------------------------------------------------------------------------

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def selected_layers(self) -> tuple[int, ...]:
        return tuple(self.transformer.config.selected_layer_index)

    @property
    def text_hidden_dim(self) -> int:
        return int(self.transformer.config.enc_hidden_dim)

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.transformer.time_text_embed.timestep_embedder.linear_1.weight.dtype

    # -------------------------------------------------------------------------------------------------------------
    # Text
    # -------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_texts(self, texts: list[str], max_sequence_length: int, device) -> PromptFeatures:
        """Run the encoder on rendered texts and drop the preamble tokens (they were context only)."""
        if self.text_feature_cache is not None:
            return self.text_feature_cache.encode(self, texts, max_sequence_length, device)
        return self._run_text_encoder(texts, max_sequence_length, device)

    @torch.no_grad()
    def _run_text_encoder(self, texts: list[str], max_sequence_length: int, device) -> PromptFeatures:
        tokens = tokenize_prompts(self.tokenizer, texts, self.prompt_date, max_sequence_length)
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
    ):
        """Text features for the prompts and the negatives.

        Returns (prompt_embeds: list of [B*n, S, hidden], prompt_mask [B*n, S] bool, negative_prompt_embeds,
        negative_prompt_mask); the negatives are None when `do_classifier_free_guidance` is False. Every negative
        empty -> all-zero features of the positive's shape with an all-False mask (no text keys at all).
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = _as_list(prompt, "prompt")
            positive = self._encode_texts(prompts, max_sequence_length, device)
        else:
            self._check_embeds(prompt_embeds, prompt_mask, "prompt_embeds")
            positive = PromptFeatures(list(prompt_embeds), self._default_mask(prompt_embeds, prompt_mask))
        positive = self._repeat(positive, num_images_per_prompt)
        if not do_classifier_free_guidance:
            return positive.embeds, positive.mask, None, None

        batch = positive.mask.shape[0] // num_images_per_prompt
        negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * batch
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {batch} prompts; give one or {batch}.")
        if all(text == "" for text in negatives):
            negative = PromptFeatures([torch.zeros_like(t) for t in positive.embeds], torch.zeros_like(positive.mask))
        else:
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
            raise ValueError(f"{name} must be a list of {layers} tensors (one per encoder layer {list(self.selected_layers)}), got {count}.")
        shape = embeds[0].shape
        for tensor in embeds:
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[-1] != width or tensor.shape != shape:
                raise ValueError(f"each tensor of {name} must be [B, S, {width}] with one shared shape, got {[tuple(getattr(t, 'shape', ())) for t in embeds]}.")
        if mask is not None and tuple(mask.shape) != tuple(shape[:2]):
            raise ValueError(f"the mask for {name} must be [B, S] = {tuple(shape[:2])}, got {tuple(mask.shape)}.")

    # -------------------------------------------------------------------------------------------------------------
    # Checks and preparation
    # -------------------------------------------------------------------------------------------------------------

    def check_inputs(self, prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, guidance_scale,
                     num_images_per_prompt, output_type, max_sequence_length) -> None:
        """Reject bad arguments with a message naming the value and what is allowed (nothing is corrected)."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give either `prompt` or `prompt_embeds` (with `prompt_mask`); both are missing.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Give either `prompt` or `prompt_embeds`, not both.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}.")
        if negative_prompt_embeds is not None:
            self._check_embeds(negative_prompt_embeds, None, "negative_prompt_embeds")

    def prepare_latents(self, batch_size: int, height: int, width: int, generator, latents, device) -> torch.Tensor:
        """Standard normal noise drawn directly in token layout [B, h*w, 128], float32."""
        shape = (batch_size, (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN), PACKED_CHANNELS)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must be packed tokens of shape {shape} for {width}x{height}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images; give one or {batch_size}.")
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int, device) -> torch.Tensor:
        """Shifted sigmas from linspace(1, 1/N, N) with the exponential time shift at mu(L, N); a final 0 appended."""
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=np.float32)
        mu = compute_mu(image_seq_len, num_inference_steps)
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
        callback_on_step_end: Callable | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        """Generate images. Missing steps / guidance come from the loaded variant's presets (Lens 20 / 5.0,
        Lens-Turbo 4 / 1.0, Lens-Base 50 / 5.0); the size from `height`/`width` or `base_resolution`/`aspect_ratio`
        (default 1024, 1:1). At guidance <= 1 the unconditional pass is skipped (it would not change the result).

        `callback_on_step_end(pipe, step, timestep, {"latents": latents})` runs after every step; it may return
        {"latents": ...} to replace them, and may set `pipe._interrupt = True` to stop early."""
        # 1. Check inputs.
        steps = self.variant_preset.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.variant_preset.guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(prompt, prompt_embeds, negative_prompt_embeds, steps, guidance, num_images_per_prompt,
                          output_type, max_sequence_length)
        height, width = resolve_size(height, width, base_resolution, aspect_ratio)
        height_tokens, width_tokens = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        device = self._execution_device
        do_cfg = guidance > 1.0
        self._interrupt = False

        # 2. Encode the prompt (or take the given features).
        embeds, mask, negative_embeds, negative_mask = self._prompt_features(
            prompt, negative_prompt, prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask,
            num_images_per_prompt, max_sequence_length, device, do_cfg,
        )
        batch_size = mask.shape[0]
        if do_cfg:  # one pass over [positive; negative]
            embeds = [torch.cat([p, n]) for p, n in zip(embeds, negative_embeds)]
            mask = torch.cat([mask, negative_mask])
        dtype = self.transformer_dtype
        embeds = [t.to(device=device, dtype=dtype) for t in embeds]
        mask = mask.to(device)

        # 3. Latents, float32 tokens. [B, h*w, 128]
        latents = self.prepare_latents(batch_size, height, width, generator, latents, device)

        # 4. Timesteps.
        timesteps = self.prepare_timesteps(steps, height_tokens * width_tokens, device)

        # 5. Denoise.
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
                latents = self.scheduler.step(velocity.float(), t, latents, return_dict=False)[0]  # float32 Euler
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, step, t, {"latents": latents}) or {}
                    latents = outputs.pop("latents", latents)
                progress.update()

        # 6. Decode.
        images = self._postprocess(latents, height_tokens, width_tokens, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LensPipelineOutput(images=images)

    def _prompt_features(self, prompt, negative_prompt, prompt_embeds, prompt_mask, negative_prompt_embeds,
                         negative_prompt_mask, num_images_per_prompt, max_sequence_length, device, do_cfg):
        if not do_cfg or negative_prompt_embeds is None:
            return self.encode_prompt(
                prompt, negative_prompt, num_images_per_prompt, max_sequence_length, device, do_cfg,
                prompt_embeds, prompt_mask,
            )
        embeds, mask, _, _ = self.encode_prompt(
            prompt, "", num_images_per_prompt, max_sequence_length, device, False, prompt_embeds, prompt_mask
        )
        negative = self._repeat(
            PromptFeatures(list(negative_prompt_embeds), self._default_mask(negative_prompt_embeds, negative_prompt_mask)),
            num_images_per_prompt,
        )
        if negative.mask.shape[0] != mask.shape[0]:
            raise ValueError(f"negative_prompt_embeds has batch {negative.mask.shape[0] // num_images_per_prompt}, prompts have {mask.shape[0] // num_images_per_prompt}.")
        length = max(mask.shape[1], negative.mask.shape[1])
        positive = pad_features(PromptFeatures(embeds, mask), length)
        negative = pad_features(PromptFeatures([t.to(device) for t in negative.embeds], negative.mask.to(device)), length)
        return positive.embeds, positive.mask, negative.embeds, negative.mask

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


__all__ = ["LensPipeline", "LensPipelineOutput", "FlowMatchEulerDiscreteScheduler", "guided_velocity"]
