"""LensGptOssEncoder against transformers' own GPT-OSS (with transformers' MXFP4 dequantization), and prompt features."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lens_core.prompt import SUFFIX, render_prompt
from lens_core.safetensors_io import iter_checkpoint_tensors
from lens_core.text_encoder import LensGptOssEncoder, dequantize_mxfp4
from lens_core.tiny import TINY_ENCODER_LAYERS, TINY_SELECTED_LAYERS


@pytest.fixture(scope="module")
def checkpoint_tensors(tiny_checkpoint):
    return dict(iter_checkpoint_tensors(tiny_checkpoint / "text_encoder"))


@pytest.fixture(scope="module")
def transformers_reference(tiny_checkpoint, checkpoint_tensors):
    """transformers' GptOssForCausalLM in float32 with experts dequantized by transformers' own function."""
    import json

    raw = json.loads((tiny_checkpoint / "text_encoder" / "config.json").read_text())
    raw.pop("quantization_config")
    config = GptOssConfig.from_dict(raw)
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).eval()
    state = {}
    for name, tensor in checkpoint_tensors.items():
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            state[base] = convert_moe_packed_tensors(tensor, checkpoint_tensors[base + "_scales"], dtype=torch.float32)
        elif not name.endswith("_scales"):
            state[name] = tensor.float()
    model.load_state_dict(state, strict=True)
    return model


def _reference_layer_outputs(model, input_ids, attention_mask):
    captured = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, index=index: captured.__setitem__(index, out[0] if isinstance(out, tuple) else out)
        )
        for index, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_dequantization_is_bitwise_equal_to_transformers(checkpoint_tensors, dtype):
    block_names = sorted(name for name in checkpoint_tensors if name.endswith("_blocks"))
    assert len(block_names) == 2 * TINY_ENCODER_LAYERS  # gate_up and down in every layer
    for name in block_names:
        blocks, scales = checkpoint_tensors[name], checkpoint_tensors[name.replace("_blocks", "_scales")]
        theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
        ours = dequantize_mxfp4(blocks, scales, dtype)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # bit patterns: -0.0 must stay -0.0
        assert torch.equal(ours.view(bits), theirs.view(bits)), name


def test_encoder_stops_after_the_last_selected_layer_and_keeps_mxfp4_bytes(tiny_checkpoint):
    encoder = LensGptOssEncoder.from_pretrained(tiny_checkpoint / "text_encoder", TINY_SELECTED_LAYERS, torch.float32)
    assert len(encoder.model.layers) == max(TINY_SELECTED_LAYERS) + 1 < TINY_ENCODER_LAYERS
    assert not any(name.startswith(("lm_head", "model.norm")) for name in encoder.state_dict())  # features only
    experts = encoder.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(experts, "gate_up_proj")


def test_features_equal_transformers_block_outputs(tiny_checkpoint, transformers_reference):
    encoder = LensGptOssEncoder.from_pretrained(tiny_checkpoint / "text_encoder", TINY_SELECTED_LAYERS, torch.float32)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 600, (2, 50), generator=generator)
    attention_mask = torch.ones(2, 50, dtype=torch.long)
    attention_mask[1, 37:] = 0  # right padding
    features = encoder(input_ids, attention_mask)
    reference = _reference_layer_outputs(transformers_reference, input_ids, attention_mask)
    assert len(features) == 4
    for index, feature in zip(TINY_SELECTED_LAYERS, features):
        torch.testing.assert_close(feature, reference[index], rtol=1e-4, atol=1e-5)


def test_prompt_features_are_the_encoder_outputs_after_the_preamble(tiny_pipe, transformers_reference):
    prompts = ["a red fox in tall grass", "two cats"]
    embeds, mask, negative_embeds, negative_mask = tiny_pipe.encode_prompt(prompts, negative_prompt="")
    tokenizer = tiny_pipe.tokenizer
    prefix_length = len(tokenizer(render_prompt("").removesuffix(SUFFIX), add_special_tokens=False)["input_ids"])
    for row, prompt in enumerate(prompts):
        ids = tokenizer(render_prompt(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]  # unpadded
        reference = _reference_layer_outputs(transformers_reference, ids, torch.ones_like(ids))
        length = ids.shape[1] - prefix_length
        assert mask[row].sum() == length and mask[row, :length].all()
        for index, feature in zip(TINY_SELECTED_LAYERS, embeds):
            torch.testing.assert_close(feature[row, :length], reference[index][0, prefix_length:], rtol=1e-4, atol=1e-5)
    # Every negative empty: zeros of the positive's shape and no valid text key at all.
    assert all(n.shape == p.shape and not n.any() for n, p in zip(negative_embeds, embeds))
    assert negative_mask.shape == mask.shape and not negative_mask.any()


def test_non_empty_negatives_are_encoded_and_padded_to_a_common_length(tiny_pipe):
    embeds, mask, negative_embeds, negative_mask = tiny_pipe.encode_prompt(
        "a fox", negative_prompt="blurry, low quality, extra fingers, watermark, text", num_images_per_prompt=2
    )
    assert mask.shape == negative_mask.shape and mask.shape[0] == 2
    assert negative_mask.sum(1).gt(mask.sum(1)).all()  # the negative is longer; the positive was zero-padded
    assert not embeds[0][0, mask[0].sum() :].any()
    alone, alone_mask, _, _ = tiny_pipe.encode_prompt(
        "blurry, low quality, extra fingers, watermark, text", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(negative_embeds[2][:1], alone[2])


def test_num_images_per_prompt_repeats_each_prompt_in_place(tiny_pipe):
    embeds, mask, _, _ = tiny_pipe.encode_prompt(
        ["first prompt", "second"], num_images_per_prompt=2, do_classifier_free_guidance=False
    )
    assert embeds[0].shape[0] == 4
    torch.testing.assert_close(embeds[1][0], embeds[1][1])
    torch.testing.assert_close(embeds[1][2], embeds[1][3])
    assert not torch.equal(embeds[1][1], embeds[1][2])


def test_a_bare_gpt_oss_model_checkpoint_loads_too(tmp_path, tiny_checkpoint, checkpoint_tensors):
    """Names without the causal-LM `model.` prefix (a GptOssModel saved on its own) give the same encoder."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "text_encoder" / "config.json", folder / "config.json")
    bare = {name.removeprefix("model."): t for name, t in checkpoint_tensors.items() if not name.startswith("lm_head")}
    save_file(bare, str(folder / "model.safetensors"))
    ours = LensGptOssEncoder.from_pretrained(folder, TINY_SELECTED_LAYERS, torch.float32)
    reference = LensGptOssEncoder.from_pretrained(tiny_checkpoint / "text_encoder", TINY_SELECTED_LAYERS, torch.float32)
    ids = torch.arange(20)[None]
    for a, b in zip(ours(ids), reference(ids)):
        torch.testing.assert_close(a, b)
