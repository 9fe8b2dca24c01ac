"""Before the loop: read the dataset, fit images to buckets, cache latents and text features, free the encoder.

The text encoder runs one caption at a time under `no_grad` (its MXFP4 experts stay as bytes and are dequantized per
expert), then it is deleted so the training loop never holds it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lens_core.image_io import BadImageError
from lens_core.latents import encode_images
from lens_core.prompt import tokenize_prompts

from .config import TrainConfig
from .data import DataPlan, fit_to_bucket, inspect_dataset
from .feature_cache import FeatureCache, content_key

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """The run was asked to stop (SIGTERM / Ctrl-C) before the loop began; what is cached so far stays cached."""


@dataclass(frozen=True)
class CachedItem:
    """One training or validation image, by its cache keys."""

    latent_key: str
    text_key: str
    bucket: tuple[int, int]  # (width, height)
    caption: str


@dataclass
class PreparedData:
    """What the loop reads: items by cache key and the sample prompts' cached features."""

    train: list[CachedItem]
    validation: list[CachedItem]
    sample_prompts: list[str]
    sample_text_keys: list[str]
    truncated_captions: int


def _model_identity(pipe) -> str:
    return content_key(
        str(getattr(pipe, "checkpoint_folder", "")), dict(pipe.vae.config), dict(pipe.transformer.config)
    )


def _caption(config: TrainConfig, text: str) -> str:
    trigger = config.data.trigger_word.strip()
    return f"{trigger}, {text}" if trigger else text


def _encode_text_cached(
    pipe, cache: FeatureCache, text: str, config: TrainConfig, identity: str, device
) -> tuple[str, bool]:
    key = content_key("text", text, pipe.prompt_date, config.model.max_sequence_length, identity)
    tokens = tokenize_prompts(pipe.tokenizer, [text], pipe.prompt_date, config.model.max_sequence_length)
    if not cache.has("text", key):
        features = pipe._run_text_encoder([text], config.model.max_sequence_length, device)
        cache.put_text(key, [layer[0].float() for layer in features.embeds])  # 4 x [S, hidden]
    return key, tokens.truncated[0]


@torch.no_grad()
def prepare_data(
    pipe,
    config: TrainConfig,
    cache: FeatureCache,
    device: torch.device,
    plan: DataPlan | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PreparedData:
    """Cache every latent and text feature the run needs (skipping what is cached) and return the item lists.

    `plan` is the checked dataset (`inspect_dataset`, done before the model was loaded); `should_stop` is asked
    before each image so a stop request ends the caching pass at once (`StopRequested`)."""
    plan = plan if plan is not None else inspect_dataset(config.data)
    identity = _model_identity(pipe)
    items, truncated = [], 0
    pipe.vae.to(device)
    place_text_encoder(pipe, device)
    for planned in plan.samples:
        if should_stop():
            raise StopRequested("stopped while caching features")
        caption = _caption(config, planned.sample.caption)
        latent_key = content_key("latent", planned.content_hash, planned.bucket, identity)
        if not cache.has("latents", latent_key):
            try:
                image = planned.sample.load_image(config.data.max_image_pixels)
            except BadImageError as error:  # changed on disk since it was checked: skip it, say so
                logger.warning("Skipping %s", error)
                continue
            pixels = fit_to_bucket(image, planned.bucket)[None].to(device)  # [1, 3, H, W]
            tokens = encode_images(pipe.vae, pixels)  # [1, L, C]
            cache.put("latents", latent_key, {"tokens": tokens[0].float()})
        text_key, was_truncated = _encode_text_cached(pipe, cache, caption, config, identity, device)
        truncated += was_truncated
        items.append(CachedItem(latent_key, text_key, planned.bucket, caption))
    if truncated:
        logger.warning(
            "%d of %d captions are longer than the %d-token text window and were truncated (the end of each is lost); "
            "shorten them or raise model.max_sequence_length.",
            truncated,
            len(items),
            config.model.max_sequence_length,
        )
    prompts = list(config.monitor.sample_prompts) or list(dict.fromkeys(item.caption for item in items))[:2]
    prompt_keys = [_encode_text_cached(pipe, cache, p, config, identity, device)[0] for p in prompts]
    count = config.data.validation_count
    if count >= len(items):
        raise ValueError(
            f"data.validation_count={count} leaves no training images out of {len(items)}; use at most {len(items) - 1}."
        )
    train, validation = (items[:-count], items[-count:]) if count else (items, [])
    logger.info("Cached %d training and %d validation images in %s", len(train), len(validation), cache.root)
    return PreparedData(train, validation, prompts, prompt_keys, truncated)


def place_text_encoder(pipe, device: torch.device) -> None:
    """Put the encoder on the device when it fits in 80% of the free memory; otherwise stream its layers from CPU
    memory (accelerate's sequential offload: a few hundred MB resident, slower, fine for a one-off caching pass)."""
    encoder = pipe.text_encoder
    if device.type != "cuda":
        encoder.to(device)
        return
    need = sum(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()])
    free, _total = torch.cuda.mem_get_info(device)
    if need < 0.8 * free:
        encoder.to(device)
        return
    from accelerate import cpu_offload

    logger.info(
        "Text encoder (%.1f GiB) does not fit the free %.1f GiB: streaming its layers for caching.",
        need / 2**30,
        free / 2**30,
    )
    cpu_offload(encoder, execution_device=device)


def free_text_encoder(pipe) -> None:
    """Drop the text encoder (features are cached): its memory goes back before training starts."""
    pipe.text_encoder = None
    pipe.register_modules(text_encoder=None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
