"""Denoiser quantization: module types, byte sizes, kept layers, and closeness to the unquantized model."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from lens_core.quantization import (
    KEEP_IN_HIGH_PRECISION,
    PRECISIONS,
    module_weight_bytes,
    quantizable_linear_names,
    quantize_transformer,
)

CPU_PRECISIONS = ("fp8", "int8", "nf4")


def _expected_class(precision: str):
    if precision == "int8":
        import bitsandbytes as bnb

        return bnb.nn.Linear8bitLt
    if precision == "nf4":
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit
    return nn.Linear  # torchao swaps the weight for a Float8Tensor, not the module


def _latents(pipe, transformer):
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red fox",
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=generator,
            output_type="latent",
        ).images
    finally:
        pipe.transformer = original


@pytest.fixture(scope="module")
def reference_latents(tiny_pipe):
    return _latents(tiny_pipe, tiny_pipe.transformer)


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_quantized_denoiser_types_sizes_and_output(tiny_pipe, reference_latents, precision):
    model = quantize_transformer(copy.deepcopy(tiny_pipe.transformer), precision)
    names = quantizable_linear_names(tiny_pipe.transformer)
    assert names and not any(p in n for n in names for p in KEEP_IN_HIGH_PRECISION)
    for name in names:
        quantized, original = model.get_submodule(name), tiny_pipe.transformer.get_submodule(name)
        assert type(quantized) is _expected_class(precision)
        dense_bytes = original.weight.numel() * original.weight.element_size()  # float32
        weight_bytes = module_weight_bytes(quantized) - (original.bias.numel() * 4 if original.bias is not None else 0)
        bits = PRECISIONS[precision].bits_per_weight
        # Stored bytes: bits/32 of float32, plus per-row / per-block scales (at most 1/4 extra on these tiny rows).
        assert dense_bytes * bits / 32 <= weight_bytes <= dense_bytes * bits / 32 * 1.3, (name, weight_bytes)
    if precision == "fp8":
        assert type(model.get_submodule(names[0]).weight).__name__ == "Float8Tensor"
        assert model.get_submodule(names[0]).weight.qdata.dtype == torch.float8_e4m3fn
    for name, module in model.named_modules():  # the kept layers are untouched float32 Linears
        if any(p in name for p in KEEP_IN_HIGH_PRECISION) and isinstance(module, nn.Linear):
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32
            assert type(module.weight) is nn.Parameter
    assert model.time_text_embed.timestep_embedder.linear_1.weight.dtype == torch.float32  # the compute dtype
    assert module_weight_bytes(model) < module_weight_bytes(tiny_pipe.transformer)
    latents = _latents(tiny_pipe, model)
    cosine = torch.nn.functional.cosine_similarity(latents.flatten(), reference_latents.flatten(), dim=0)
    assert cosine >= 0.98, f"{precision}: cosine {cosine:.4f} to the unquantized output"


def test_fp8_compute_needs_a_cuda_gpu(tiny_pipe):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; see the gpu test")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        quantize_transformer(copy.deepcopy(tiny_pipe.transformer), "fp8-compute")


def test_bad_precision_and_double_quantization(tiny_pipe):
    with pytest.raises(ValueError, match="Unknown denoiser precision 'int3'.*nf4"):
        quantize_transformer(copy.deepcopy(tiny_pipe.transformer), "int3")
    model = quantize_transformer(copy.deepcopy(tiny_pipe.transformer), "int8")
    with pytest.raises(ValueError, match="already quantized to 'int8'"):
        quantize_transformer(model, "nf4")


def test_missing_package_names_the_install_command(tiny_pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        quantize_transformer(copy.deepcopy(tiny_pipe.transformer), "nf4")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "int8", "nf4", "fp8-compute"])
def test_real_size_quantized_denoiser_stays_close_to_bf16(precision):
    """The random real-size denoiser at 1024x1024: one forward pass, quantized vs bf16, same inputs."""
    from lens_core.bench import _fill_random_
    from lens_core.quantization import check_precision_available
    from lens_core.transformer_lens import LensTransformer2DModel

    try:
        check_precision_available(precision, "cuda")
    except ValueError as error:
        pytest.skip(str(error))
    with torch.device("meta"):
        model = LensTransformer2DModel()
    model = model.to_empty(device="cpu")
    _fill_random_(model, torch.Generator().manual_seed(0))
    model = model.to("cuda", torch.bfloat16).eval()
    generator = torch.Generator("cuda").manual_seed(0)
    image = torch.randn(1, 4096, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    text = [torch.randn(1, 128, 2880, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(4)]
    kwargs = dict(
        hidden_states=image,
        encoder_hidden_states=text,
        img_shapes=[(1, 64, 64)],
        return_dict=False,
        encoder_hidden_states_mask=torch.ones(1, 128, dtype=torch.bool, device="cuda"),
        timestep=torch.full((1,), 0.7, device="cuda", dtype=torch.bfloat16),
    )
    with torch.no_grad():
        reference = model(**kwargs)[0].float()
        quantize_transformer(model, precision)
        output = model(**kwargs)[0].float()
    cosine = torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)
    assert cosine >= 0.98, f"{precision}: cosine {cosine:.4f}"
