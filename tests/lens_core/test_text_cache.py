"""The text-feature cache: same features as an uncached call, and the encoder runs once per distinct prompt."""

from __future__ import annotations

import copy

import pytest
import torch

from lens_core.text_cache import TextFeatureCache

PROMPTS = ["a red fox in the grass", "two cats on a striped blanket, one black and one white", "a red fox in the grass"]


@pytest.fixture()
def pipe(tiny_pipe):
    pipe = copy.copy(tiny_pipe)  # shallow: shares the modules, owns its cache attribute
    pipe.text_feature_cache = TextFeatureCache()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count_encoder_calls(pipe) -> list[int]:
    calls = [0]

    def count(_module, _args, _output):
        calls[0] += 1

    pipe.text_encoder.register_forward_hook(count)
    return calls


def test_cached_batch_equals_uncached(pipe, tiny_pipe):
    reference = tiny_pipe._run_text_encoder(PROMPTS, 512, "cpu")
    cached = pipe._encode_texts(PROMPTS, 512, "cpu")
    assert torch.equal(cached.mask, reference.mask)
    for ours, theirs in zip(cached.embeds, reference.embeds, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours[cached.mask], theirs[reference.mask], rtol=1e-5, atol=1e-5)
        assert not ours[~cached.mask].any()  # padding is zeros
    again = pipe._encode_texts(PROMPTS, 512, "cpu")  # all hits now
    for ours, theirs in zip(again.embeds, cached.embeds, strict=True):
        assert torch.equal(ours, theirs)


def test_encoder_runs_once_per_prompt(pipe):
    calls = _count_encoder_calls(pipe)
    images = []
    for seed, steps in ((0, 2), (1, 3)):
        generator = torch.Generator().manual_seed(seed)
        images.append(
            pipe(
                "a red fox",
                height=32,
                width=32,
                num_inference_steps=steps,
                guidance_scale=1.0,
                generator=generator,
                output_type="pt",
            ).images
        )
    assert calls[0] == 1
    assert pipe.text_feature_cache.misses == 1 and pipe.text_feature_cache.hits == 1
    pipe("a blue fox", height=48, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert calls[0] == 2 and len(pipe.text_feature_cache) == 2


def test_image_with_cache_equals_image_without(pipe, tiny_pipe):
    kwargs = dict(
        prompt="a red fox",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pt",
    )
    without = tiny_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    with_cache = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(with_cache, without, rtol=1e-4, atol=1e-4)


def test_key_depends_on_text_date_length_and_encoder(pipe, tiny_checkpoint):
    from lens_core import LensPipeline

    key = TextFeatureCache.key(pipe, "a fox", 512)
    assert key == TextFeatureCache.key(pipe, "a fox", 512)
    assert key != TextFeatureCache.key(pipe, "a fox.", 512)
    assert key != TextFeatureCache.key(pipe, "a fox", 256)
    other_date = copy.copy(pipe)
    other_date.prompt_date = "2026-01-01"
    assert key != TextFeatureCache.key(other_date, "a fox", 512)
    reloaded = LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
    assert key != TextFeatureCache.key(reloaded, "a fox", 512)


def test_eviction_and_bad_size(pipe):
    pipe.text_feature_cache = TextFeatureCache(max_bytes=1)
    pipe._encode_texts(["one"], 512, "cpu")
    pipe._encode_texts(["two"], 512, "cpu")
    assert len(pipe.text_feature_cache) == 1  # the newest entry stays, even above the budget
    with pytest.raises(ValueError, match="max_bytes must be a positive integer, got 0"):
        TextFeatureCache(max_bytes=0)
