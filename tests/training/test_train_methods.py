"""Other methods and settings on short tiny runs: LoKr (saved and loaded back) on an fp8 base, the frozen base built by
the app's quantizer (one keep list, one int8 threshold), QLoRA with 8-bit AdamW on CPU, caption window warnings."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from train_helpers import CAPTIONS, make_toy_dataset, tiny_overrides

from lens_core import LensPipeline
from lens_core.prompt import SUFFIX, render_prefix
from lens_core.quantization import KEEP_IN_HIGH_PRECISION, quantizable_linear_names, quantize_transformer
from training.base_precision import freeze_base
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


@pytest.mark.parametrize("precision", ["fp8", "int8", "nf4"])
def test_the_frozen_base_is_quantized_exactly_as_the_app_runs_it(tiny_pipe, precision):
    """One quantizer: the trainer's frozen base and the app's quantized denoiser have the same layers, the same kept
    high-precision layers and the same stored weights."""
    trained = freeze_base(copy.deepcopy(tiny_pipe.transformer), precision, torch.device("cpu"))
    served = quantize_transformer(copy.deepcopy(tiny_pipe.transformer).to(torch.bfloat16), precision)
    trained_modules, served_modules = dict(trained.named_modules()), dict(served.named_modules())
    assert trained_modules.keys() == served_modules.keys()
    for name, module in trained_modules.items():
        assert type(module) is type(served_modules[name]), name
    kept = {n for n, m in trained_modules.items() if type(m) is nn.Linear and type(m.weight) is nn.Parameter}
    assert kept == {
        n
        for n, m in trained_modules.items()
        if isinstance(m, nn.Linear) and n not in quantizable_linear_names(tiny_pipe.transformer)
    }
    assert kept and all(any(p in n for p in KEEP_IN_HIGH_PRECISION) for n in kept)
    for name in quantizable_linear_names(tiny_pipe.transformer):
        a, b = trained_modules[name].weight, served_modules[name].weight
        assert torch.equal(getattr(a, "qdata", a).view(torch.uint8), getattr(b, "qdata", b).view(torch.uint8)), name
    assert not any(p.requires_grad for p in trained.parameters())


def test_qlora_int8_base_with_8bit_adam_trains_on_cpu(tiny_checkpoint, dataset, tmp_path):
    """bitsandbytes runs on CPU: an int8 base (the app's quantizer) with 8-bit AdamW trains and exports a LoRA."""
    overrides = tiny_overrides(
        tiny_checkpoint,
        dataset,
        tmp_path / "qlora",
        2,
        **{"model.base_precision": "int8", "optimizer.name": "adamw8bit", "optimizer.learning_rate": 1e-2},
    )
    outputs = LensTrainer(build_config({}, overrides)).run()
    losses = [e["loss"] for e in read_progress(tmp_path / "qlora") if e["event"] == "step"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
    pipe.load_lora_weights(outputs["diffusers"])
    assert pipe.get_active_adapters()


def test_long_captions_are_counted_and_reported(tiny_pipe, dataset, tmp_path, caplog):
    window = len(tiny_pipe.tokenizer(render_prefix() + SUFFIX, add_special_tokens=False)["input_ids"]) + 3
    config = build_config({}, tiny_overrides("unused", dataset, tmp_path, 1, **{"model.max_sequence_length": window}))
    with caplog.at_level(logging.WARNING):
        data = prepare_data(tiny_pipe, config, FeatureCache(tmp_path / "cache"), torch.device("cpu"))
    assert data.truncated_captions == 2
    assert "2 of 2 captions are longer than the" in caplog.text
