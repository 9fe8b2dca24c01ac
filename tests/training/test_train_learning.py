"""The trainer really teaches the model: a LoRA learns which caption goes with which of two image patterns.

A random tiny denoiser cannot denoise at all, and a LoRA on a random frozen base cannot learn denoising and caption
binding at once in a CPU budget. So, as in real use, the LoRA starts from a "pre-trained" base: the tiny denoiser
(widened to 128 channels) fully fine-tuned by the same trainer on two *other* captioned patterns. A LoRA trained on that
base with two new captions and patterns must put each caption's samples nearer its own pattern than the other's, in
latent space, where the base alone does not. The same run's LoRA goes through save, ComfyUI/kohya export and
`load_lora_weights`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import CAPTIONS, build_wide_tiny_checkpoint, make_toy_dataset, tiny_overrides

from lens_core import LensPipeline
from training.config import build_config
from training.progress import read_progress
from training.trainer import LensTrainer

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def pretrained(tiny_checkpoint, tmp_path_factory):
    """(checkpoint folder, pre-trained denoiser file, dataset)."""
    root = tmp_path_factory.mktemp("learning")
    checkpoint = build_wide_tiny_checkpoint(tiny_checkpoint, root / "wide")
    data = make_toy_dataset(root / "data", copies=2)
    base_data = make_toy_dataset(root / "base-data", copies=2, base=True)
    overrides = tiny_overrides(
        checkpoint,
        base_data,
        root / "pretrain",
        300,
        **{"adapter.method": "full", "data.caption_dropout": 0.1, "optimizer.learning_rate": 2e-3, "name": "base"},
    )
    outputs = LensTrainer(build_config({}, overrides)).run()
    return checkpoint, outputs["transformer"], data


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
    checkpoint, base_file, data = pretrained
    output = tmp_path_factory.mktemp("lora-run")
    overrides = tiny_overrides(
        checkpoint,
        data,
        output,
        200,
        **{
            "model.transformer_file": base_file,
            "adapter.rank": 16,
            "adapter.alpha": 16.0,
            "optimizer.learning_rate": 3e-3,
            "data.caption_dropout": 0.1,
        },
    )
    trainer = LensTrainer(build_config({}, overrides))
    outputs = trainer.run()
    patterns = {item.caption: trainer.cache.get("latents", item.latent_key)["tokens"] for item in trainer.data.train}
    return trainer, outputs, patterns


def test_the_loss_falls(pretrained, lora_run):
    checkpoint, base_file, _data = pretrained
    base_losses = [e["loss"] for e in read_progress(checkpoint.parent / "pretrain") if e["event"] == "step"]
    assert np.mean(base_losses[-40:]) < 0.5 * np.mean(base_losses[:20])
    trainer, _outputs, _patterns = lora_run
    events = read_progress(trainer.output_dir)
    lora_losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(lora_losses) == trainer.config.loop.max_steps
    assert np.mean(lora_losses[-40:]) < np.mean(lora_losses[:20])
    assert any(e["event"] == "samples" and e["step"] == 0 for e in events)  # base-model samples before training


def _margins(pipe, patterns) -> list[float]:
    """Distance to the other pattern minus distance to the caption's own, for each caption and seed (> 0 = right)."""
    margins = []
    for caption in CAPTIONS:
        other = next(c for c in CAPTIONS if c != caption)
        for seed in SEEDS:
            sample = pipe(
                caption,
                height=64,
                width=64,
                num_inference_steps=12,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            ).images[0]  # [16, 128]
            margins.append(float((sample - patterns[other]).norm() - (sample - patterns[caption]).norm()))
    return margins


def test_samples_land_nearer_their_own_pattern(pretrained, lora_run):
    checkpoint, base_file, _data = pretrained
    _trainer, outputs, patterns = lora_run
    pipe = LensPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32, transformer_file=base_file)
    before = _margins(pipe, patterns)
    pipe.load_lora_weights(outputs["diffusers"])
    after = _margins(pipe, patterns)
    assert min(after) > 0, f"some samples are nearer the other caption's pattern: margins {after}"
    # The base never saw these captions: the LoRA is what put the samples on the right side.
    assert np.mean(after) > np.mean(before) + 1.0, f"margins before {before}, after {after}"


def test_exports_load_to_the_same_model(pretrained, lora_run):
    checkpoint, base_file, _data = pretrained
    _trainer, outputs, _patterns = lora_run
    pipe = LensPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32, transformer_file=base_file)
    results = []
    for kind in ("diffusers", "comfyui", "kohya"):
        pipe.load_lora_weights(outputs[kind])
        results.append(
            pipe(
                CAPTIONS[0],
                height=64,
                width=64,
                num_inference_steps=2,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images
        )
        pipe.unload_lora_weights()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=1e-6)
