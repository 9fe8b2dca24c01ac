"""Our MXFP4 dequantization equals transformers' own, bit for bit, on the tiny checkpoint's expert tensors."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lens_core.safetensors_io import iter_checkpoint_tensors
from lens_core.text_encoder import dequantize_mxfp4


@pytest.fixture(scope="module")
def expert_tensors(tiny_checkpoint):
    return {
        name: tensor
        for name, tensor in iter_checkpoint_tensors(tiny_checkpoint / "text_encoder")
        if "experts" in name and name.endswith(("_blocks", "_scales"))
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_mxfp4_is_bitwise_transformers(expert_tensors, dtype):
    blocks_names = sorted(name for name in expert_tensors if name.endswith("_blocks"))
    assert len(blocks_names) == 12  # 6 layers x (gate_up, down)
    for name in blocks_names:
        blocks, scales = expert_tensors[name], expert_tensors[name.replace("_blocks", "_scales")]
        ours = dequantize_mxfp4(blocks, scales, dtype)  # [E, in, out]
        theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert torch.equal(
            ours.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        ), name


def test_encoder_keeps_experts_as_bytes(tiny_pipe):
    experts = tiny_pipe.text_encoder.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and experts.down_proj_scales.dtype == torch.uint8
    assert not hasattr(experts, "gate_up_proj")  # no dense copy next to the bytes
    names = set(tiny_pipe.text_encoder.state_dict())
    assert not any(name.startswith(("lm_head", "model.norm")) for name in names)  # features only
    assert len(tiny_pipe.text_encoder.model.layers) == max(tiny_pipe.selected_layers) + 1  # stops at the last needed


def test_encoder_features_match_transformers_with_dequantized_experts(tiny_checkpoint, tiny_pipe):
    """transformers' GptOssForCausalLM with the experts dequantized by transformers itself, layer outputs hooked."""
    import json

    from transformers import GptOssConfig, GptOssForCausalLM

    from lens_core.prompt import tokenize_prompts

    folder = tiny_checkpoint / "text_encoder"
    raw = json.loads((folder / "config.json").read_text())
    config = GptOssConfig.from_dict({k: v for k, v in raw.items() if k != "quantization_config"})
    config._attn_implementation = "eager"
    reference = GptOssForCausalLM(config).float().eval()
    tensors = dict(iter_checkpoint_tensors(folder))
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            scales = tensors[name.replace("_blocks", "_scales")]
            state[name.removesuffix("_blocks")] = convert_moe_packed_tensors(
                blocks=tensor.clone(), scales=scales.clone(), dtype=torch.float32
            )
        else:
            state[name] = tensor.float()
    reference.load_state_dict(state, strict=True)
    outputs = {}
    for index in tiny_pipe.selected_layers:
        reference.model.layers[index].register_forward_hook(
            lambda module, args, output, index=index: outputs.__setitem__(
                index, output[0] if isinstance(output, tuple) else output
            )
        )
    tokens = tokenize_prompts(tiny_pipe.tokenizer, ["a red fox", "two cats on a striped blanket"])
    with torch.no_grad():
        reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        ours = tiny_pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)
    real = tokens.attention_mask.bool()
    for layer, feature in zip(tiny_pipe.selected_layers, ours, strict=True):
        torch.testing.assert_close(feature[real], outputs[layer][real], rtol=1e-4, atol=1e-4)
