"""Other methods and settings on short tiny runs: LoKr (saved and loaded back), an fp8-stored frozen base, caption
window warnings."""

from __future__ import annotations

import logging

import pytest
import torch
from train_helpers import CAPTIONS, make_toy_dataset, tiny_overrides

from lens_core import LensPipeline
from lens_core.prompt import SUFFIX, render_prefix
from training.config import build_config
from training.feature_cache import FeatureCache
from training.prepare import prepare_data
from training.progress import read_progress
from training.trainer import LensTrainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("methods-data"), copies=1)


def test_lokr_on_an_fp8_base_trains_saves_and_loads(tiny_checkpoint, dataset, tmp_path):
    overrides = tiny_overrides(
        tiny_checkpoint,
        dataset,
        tmp_path / "lokr",
        4,
        **{
            "adapter.method": "lokr",
            "adapter.rank": 4,
            "adapter.alpha": 4.0,
            "model.base_precision": "fp8",
            "optimizer.learning_rate": 1e-2,
            "optimizer.name": "adafactor",
        },
    )
    outputs = LensTrainer(build_config({}, overrides)).run()
    losses = [e["loss"] for e in read_progress(tmp_path / "lokr") if e["event"] == "step"]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
    base = pipe(
        CAPTIONS[0],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    pipe.load_lora_weights(outputs["diffusers"])
    adapted = pipe(
        CAPTIONS[0],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert not torch.allclose(base, adapted)  # the LoKr factors were trained and loaded


def test_nf4_base_and_8bit_adam_need_cuda(tiny_checkpoint, dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    for key, value, message in (
        ("model.base_precision", "nf4", "needs a CUDA GPU"),
        ("optimizer.name", "adamw8bit", "needs a CUDA GPU"),
    ):
        overrides = tiny_overrides(tiny_checkpoint, dataset, tmp_path / value, 2, **{key: value})
        with pytest.raises(ValueError, match=message):
            LensTrainer(build_config({}, overrides)).run()


def test_long_captions_are_counted_and_reported(tiny_pipe, dataset, tmp_path, caplog):
    window = len(tiny_pipe.tokenizer(render_prefix() + SUFFIX, add_special_tokens=False)["input_ids"]) + 3
    config = build_config({}, tiny_overrides("unused", dataset, tmp_path, 1, **{"model.max_sequence_length": window}))
    with caplog.at_level(logging.WARNING):
        data = prepare_data(tiny_pipe, config, FeatureCache(tmp_path / "cache"), torch.device("cpu"))
    assert data.truncated_captions == 2
    assert "2 of 2 captions are longer than the" in caplog.text
