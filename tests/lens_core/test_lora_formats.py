"""Lens LoRA files: diffusers/PEFT, ComfyUI and kohya key names load to the same model; foreign LoRAs are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lens_core import LensPipeline
from lens_core.lora import (
    LensLora,
    LensLoraError,
    list_loras,
    lora_to_state_dict,
    read_lora,
    save_lora,
)

MODULES = ("transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.img_mlp.w2", "transformer_blocks.0.txt_mlp.w1")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """A private pipeline (these tests add and remove adapters)."""
    return LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def lora(pipe):
    """A random rank-4 LoRA on three Lens modules, with alpha 8 (scale 2) so alpha handling is visible."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name in MODULES:
        linear = pipe.transformer.get_submodule(name)
        tensors[name] = {
            "lora_A.weight": torch.randn(4, linear.in_features, generator=generator) * 0.3,
            "lora_B.weight": torch.randn(linear.out_features, 4, generator=generator) * 0.3,
        }
    return LensLora(
        "lora",
        tensors,
        dict.fromkeys(MODULES, 4),
        dict.fromkeys(MODULES, 8.0),
        {"lens.trigger_word": "sks", "lens.base_model": "tiny"},
    )


def _latents(pipe):
    return pipe(
        "a red fox",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def test_all_formats_give_the_same_model_and_unload_restores_the_base(pipe, lora, tmp_path):
    base = _latents(pipe)
    results = {}
    for file_format in ("diffusers", "comfyui", "kohya"):
        path = save_lora(lora, tmp_path / f"l_{file_format}.safetensors", file_format)
        name = pipe.load_lora_weights(path, weight=1.0)
        results[file_format] = _latents(pipe)
        assert pipe.get_active_adapters() == {name: 1.0}
        pipe.unload_lora_weights()
        assert torch.equal(_latents(pipe), base)
    assert not torch.allclose(results["diffusers"], base, atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(results["comfyui"], results["diffusers"], rtol=0, atol=1e-6)
    torch.testing.assert_close(results["kohya"], results["diffusers"], rtol=0, atol=1e-6)


def test_key_names_of_each_format(lora):
    module = "transformer_blocks.0.attn.img_qkv"
    assert f"transformer.{module}.lora_A.weight" in lora_to_state_dict(lora, "diffusers")
    comfy = lora_to_state_dict(lora, "comfyui")
    assert f"diffusion_model.{module}.lora_B.weight" in comfy and comfy[f"diffusion_model.{module}.alpha"].item() == 8.0
    kohya = lora_to_state_dict(lora, "kohya")
    assert "lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight" in kohya
    assert "lora_unet_transformer_blocks_0_attn_img_qkv.alpha" in kohya


def test_weight_scales_and_alpha_is_honoured(pipe, lora, tmp_path):
    path = save_lora(lora, tmp_path / "scaled.safetensors")
    pipe.load_lora_weights(path, adapter_name="a", weight=0.0)
    zero = _latents(pipe)
    pipe.set_adapters("a", 1.0)
    full = _latents(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(zero, _latents(pipe))  # weight 0 = the base model
    # The same factors with alpha = rank (scale 1) at weight 2 equal alpha = 2 * rank at weight 1.
    halved = LensLora("lora", lora.tensors, lora.ranks, dict.fromkeys(MODULES, 4.0))
    path = save_lora(halved, tmp_path / "alpha4.safetensors", "kohya")
    pipe.load_lora_weights(path, weight=2.0)
    torch.testing.assert_close(_latents(pipe), full, rtol=0, atol=1e-5)
    pipe.unload_lora_weights()


def test_a_lora_for_another_model_is_refused(pipe, tmp_path):
    flux_like = {
        "transformer.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072),
        "transformer.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9216, 4),
    }
    save_file(flux_like, str(tmp_path / "flux.safetensors"))
    with pytest.raises(LensLoraError, match=r"not a LoRA for this Lens denoiser.*double_blocks"):
        pipe.load_lora_weights(tmp_path / "flux.safetensors")
    wrong_size = {
        "transformer.transformer_blocks.0.attn.img_qkv.lora_A.weight": torch.zeros(4, 1536),
        "transformer.transformer_blocks.0.attn.img_qkv.lora_B.weight": torch.zeros(4608, 4),
    }
    save_file(wrong_size, str(tmp_path / "real_size.safetensors"))
    with pytest.raises(LensLoraError, match="different model size"):
        read_lora(tmp_path / "real_size.safetensors", pipe.transformer)
    save_file(
        {"x.lora_A.weight": torch.zeros(1, 1)},
        str(tmp_path / "sdxl.safetensors"),
        metadata={"lens.model_family": "sdxl"},
    )
    with pytest.raises(LensLoraError, match="model family 'sdxl', not Lens"):
        read_lora(tmp_path / "sdxl.safetensors", pipe.transformer)
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing half-loaded


def test_list_loras_finds_trained_files(lora, tmp_path):
    save_lora(lora, tmp_path / "run" / "lora" / "mine.safetensors")
    save_lora(lora, tmp_path / "run" / "lora" / "comfyui" / "mine_comfyui.safetensors", "comfyui")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "run" / "other.safetensors"))
    found = list_loras(tmp_path)
    assert [info.path.name for info in found] == ["mine.safetensors"]
    assert found[0].trigger_word == "sks"
    assert len(list_loras(tmp_path, key_format=None)) == 2
