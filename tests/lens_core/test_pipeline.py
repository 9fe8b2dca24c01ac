"""LensPipeline end to end on the tiny checkpoint, against the plain spec re-implementation of sampler and decode."""

from __future__ import annotations

import math

import lens_reference as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F

HEIGHT, WIDTH = 48, 64  # 3 x 4 image tokens


def _reference_images(pipe, prompt, negative, guidance, steps, seed, height=HEIGHT, width=WIDTH):
    """Features from encode_prompt (tested against transformers elsewhere), then the spec's sampler and decode."""
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    negative_embeds, negative_mask = ref.negative_branch(
        embeds, mask, [negative], lambda texts: pipe.encode_prompt(texts, do_classifier_free_guidance=False)[:2]
    )
    length = max(mask.shape[1], negative_mask.shape[1])  # right-pad both to one length, as the pipeline does

    def pad(layers, m):
        return (
            [F.pad(t, (0, 0, 0, length - t.shape[1])) for t in layers],
            F.pad(m, (0, length - m.shape[1])),
        )

    (embeds, mask), (negative_embeds, negative_mask) = pad(embeds, mask), pad(negative_embeds, negative_mask)
    h, w = height // pipe.pixels_per_token, width // pipe.pixels_per_token
    channels = pipe.transformer.config.in_channels
    noise = torch.randn(1, h * w, channels, generator=torch.Generator().manual_seed(seed))
    state, config = pipe.transformer.state_dict(), dict(pipe.transformer.config)

    def velocity(x, t, layers, text_mask):
        return ref.denoiser_forward(state, config, x, layers, text_mask, t, h, w)

    with torch.no_grad():
        latents = ref.sample(velocity, noise, steps, guidance, (embeds, mask), (negative_embeds, negative_mask))
        image = ref.decode(pipe.vae, latents, h, w)
    return latents, image


@pytest.mark.parametrize(
    "guidance,negative",
    [(5.0, ""), (5.0, "blurry, dark"), (1.0, ""), (1.0, "blurry"), (0.5, "blurry, dark"), (0.0, ""), (5.0, "  \t ")],
)
def test_sampler_and_decode_match_the_spec(tiny_pipe, guidance, negative):
    """Guidance 0, 0.5, 1 and 5 (combined and rescaled, as the official does; at 1 we skip the unconditional pass and
    must still agree) and a whitespace-only negative (empty, as the official treats it)."""
    prompt, steps, seed = "a red fox sitting in tall green grass", 4, 7
    expected_latents, expected_image = _reference_images(tiny_pipe, prompt, negative, guidance, steps, seed)
    kwargs = dict(
        prompt=prompt,
        negative_prompt=negative,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=guidance,
    )
    latents = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    image = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    torch.testing.assert_close(latents, expected_latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image, expected_image, rtol=1e-4, atol=1e-5)
    assert image.shape == (1, 3, HEIGHT, WIDTH)


def test_guidance_below_one_is_not_the_conditional_prediction(tiny_pipe):
    """At 0.5 and 0 the combination changes the result (the old "<= 1 skips" shortcut would not)."""
    common = dict(prompt="a red fox", negative_prompt="", height=32, width=32, num_inference_steps=2)

    def run(g):
        return tiny_pipe(
            **common, guidance_scale=g, generator=torch.Generator().manual_seed(0), output_type="latent"
        ).images

    at_one = run(1.0)
    for guidance in (0.5, 0.0):
        assert (run(guidance) - at_one).abs().max() > 1e-3


def test_guidance_one_skips_the_unconditional_pass(tiny_pipe):
    batches = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        for guidance in (1.0, 3.0, 0.5, 0.0, 1):
            tiny_pipe(
                "a fox", height=32, width=32, num_inference_steps=2, guidance_scale=guidance, output_type="latent"
            )
    finally:
        hook.remove()
    assert batches == [1, 1, 2, 2, 2, 2, 2, 2, 1, 1]  # only exactly 1 skips the unconditional pass


def test_output_types_and_pil_truncation(tiny_pipe):
    common = dict(prompt="a fox", height=32, width=48, num_inference_steps=2, guidance_scale=1.0)
    pt = tiny_pipe(**common, generator=torch.Generator().manual_seed(1), output_type="pt").images
    as_np = tiny_pipe(**common, generator=torch.Generator().manual_seed(1), output_type="np").images
    pil = tiny_pipe(**common, generator=torch.Generator().manual_seed(1), output_type="pil").images
    assert as_np.shape == (1, 32, 48, 3) and pil[0].size == (48, 32)
    np.testing.assert_allclose(as_np[0], pt[0].permute(1, 2, 0).numpy(), atol=1e-6)
    expected = (pt[0].permute(1, 2, 0) * 2 * 127.5).to(torch.uint8).numpy()  # (x + 1) * 127.5, truncated
    assert np.abs(np.asarray(pil[0]).astype(int) - expected.astype(int)).max() <= 1


def test_embeds_latents_and_batches(tiny_pipe):
    embeds, mask, _, _ = tiny_pipe.encode_prompt("a fox", do_classifier_free_guidance=False)
    noise = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(3))
    common = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    from_prompt = tiny_pipe(prompt="a fox", num_images_per_prompt=2, latents=noise, **common).images
    from_embeds = tiny_pipe(
        prompt_embeds=embeds, prompt_mask=mask, num_images_per_prompt=2, latents=noise, **common
    ).images
    torch.testing.assert_close(from_prompt, from_embeds)
    generators = [torch.Generator().manual_seed(s) for s in (10, 11)]
    batch = tiny_pipe(prompt="a fox", num_images_per_prompt=2, generator=generators, **common).images
    single = tiny_pipe(prompt="a fox", generator=torch.Generator().manual_seed(11), **common).images
    torch.testing.assert_close(batch[1:], single)


def test_variant_defaults_and_callback(tiny_pipe):
    steps_seen = []

    def callback(pipe, step, timestep, tensors):
        steps_seen.append(step)
        return {"latents": tensors["latents"]}

    tiny_pipe("a fox", height=32, width=32, output_type="latent", callback_on_step_end=callback)
    assert steps_seen == list(range(tiny_pipe.variant_preset.num_inference_steps))

    def stop_after_one(pipe, step, timestep, tensors):
        pipe._interrupt = True

    steps_seen.clear()
    tiny_pipe(
        "a fox",
        height=32,
        width=32,
        num_inference_steps=5,
        output_type="latent",
        callback_on_step_end=lambda *a: (steps_seen.append(a[1]), stop_after_one(*a))[1],
    )
    assert steps_seen == [0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt="x", height=40, width=32), "multiple of 16"),
        (dict(prompt="x", num_inference_steps=0), "positive integer"),
        (dict(prompt="x", guidance_scale=-1.0), "finite number >= 0"),
        (dict(prompt="x", guidance_scale=math.nan), "finite number >= 0"),
        (dict(prompt="x", guidance_scale=math.inf), "finite number >= 0"),
        (dict(), "Give either `prompt` or `prompt_embeds`"),
        (dict(prompt="x", output_type="jpeg"), "output_type must be one of"),
        (dict(prompt_embeds=[torch.zeros(1, 3, 64)] * 3), "list of 4 tensors"),
        (dict(prompt_embeds=[torch.zeros(1, 3, 32)] * 4), r"\[B, S, 64\]"),
        (dict(prompt="x", latents=torch.zeros(1, 5, 128)), "latents must be packed tokens of shape"),
        (
            dict(prompt=["a", "b"], negative_prompt=["n1", "n2", "n3"], guidance_scale=4.0),
            "negative_prompt has 3 entries",
        ),
        (dict(prompt=""" """, max_sequence_length=10), "leaves no room"),
        (dict(prompt=3), "prompt must be a string"),
    ],
)
def test_bad_input_is_refused(tiny_pipe, kwargs, message):
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**kwargs)


def test_a_step_count_without_a_usable_schedule_is_refused(tiny_pipe):
    """mu falls with the step count; past about 13,000 steps exp(mu) underflows in float32 and the first sigma is
    0 / 0."""
    assert torch.isfinite(tiny_pipe.prepare_timesteps(13_000, 16, "cpu")).all()
    with pytest.raises(ValueError, match="num_inference_steps=14000 gives no usable schedule"):
        tiny_pipe.prepare_timesteps(14_000, 16, "cpu")
