"""`LensGptOssEncoder`: GPT-OSS-20B as a text-feature extractor (LENS_SPEC section 3).

The features are the residual stream *output by* decoder layers 5, 11, 17 and 23 (before the final norm), so the
encoder stops after the last needed layer and never runs `lm_head`. Expert weights stay in their MXFP4 bytes as ordinary
tensors and are dequantized one expert at a time on whatever device the layer is on, in plain PyTorch: no triton, no
`kernels` package, and never a silent 41.8 GB bf16 copy.

The attention, norms and router come from transformers' GPT-OSS implementation; only the experts are ours.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import GptOssConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssDecoderLayer,
    GptOssRotaryEmbedding,
)

from .safetensors_io import iter_checkpoint_tensors

logger = logging.getLogger(__name__)

# FP4 E2M1 code -> value; codes 8..15 are the negated 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# GPT-OSS-20B's YaRN RoPE (theta 150000, factor 32), as its config states it.
GPT_OSS_ROPE_PARAMETERS = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}
MXFP4_BLOCK = 32  # elements per shared scale byte
FP32_MODULE_NAMES = ("input_layernorm", "post_attention_layernorm", "norm")  # kept in float32, as transformers does


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 bytes -> dense weights in the layout `x @ W` uses.

    blocks: [..., out, G, 16] uint8 (two codes per byte, low nibble first); scales: [..., out, G] uint8 (2^(s - 127)).
    Returns [..., in = G * 32, out].
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match.")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., out, G, 16, 2]
    values = values.flatten(-2)  # [..., out, G, 32]
    exponents = scales.to(torch.int32)[..., None] - 127  # [..., out, G, 1]
    values = torch.ldexp(values, exponents)  # exact: a power-of-two scale of a value with a 2-bit mantissa
    return values.flatten(-2).transpose(-1, -2).to(dtype)  # [..., in, out]


class LensGptOssExperts(nn.Module):
    """GPT-OSS experts that keep MXFP4 weights as bytes (or plain dense weights) and dequantize per expert.

    Same call as transformers' `GptOssExperts`: (hidden [T, H], router_indices [T, k], routing_weights [T, k]).
    """

    def __init__(self, config: GptOssConfig, mxfp4: bool):
        super().__init__()
        experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.mxfp4 = experts, mxfp4
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        if mxfp4:
            self.register_buffer("gate_up_proj_blocks", torch.empty(experts, 2 * inter, hidden // MXFP4_BLOCK, 16, dtype=torch.uint8))
            self.register_buffer("gate_up_proj_scales", torch.empty(experts, 2 * inter, hidden // MXFP4_BLOCK, dtype=torch.uint8))
            self.register_buffer("down_proj_blocks", torch.empty(experts, hidden, inter // MXFP4_BLOCK, 16, dtype=torch.uint8))
            self.register_buffer("down_proj_scales", torch.empty(experts, hidden, inter // MXFP4_BLOCK, dtype=torch.uint8))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, hidden, 2 * inter))
            self.down_proj = nn.Parameter(torch.empty(experts, inter, hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * inter))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))

    def expert_weights(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (gate_up [H, 2I], down [I, H]) for one expert, dequantized on the device the bytes are on."""
        if not self.mxfp4:
            return self.gate_up_proj[index].to(dtype), self.down_proj[index].to(dtype)
        gate_up = dequantize_mxfp4(self.gate_up_proj_blocks[index], self.gate_up_proj_scales[index], dtype)
        down = dequantize_mxfp4(self.down_proj_blocks[index], self.down_proj_scales[index], dtype)
        return gate_up, down

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)  # [T, H]
        # expert_mask[e, k, t] = token t chose expert e as its k-th pick.
        expert_mask = nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
        for expert in torch.nonzero(expert_mask.sum(dim=(-1, -2)) > 0).flatten().tolist():
            top_k_position, token_index = torch.where(expert_mask[expert])
            gate_up_weight, down_weight = self.expert_weights(expert, hidden_states.dtype)
            gate_up = hidden_states[token_index] @ gate_up_weight + self.gate_up_proj_bias[expert]  # [t, 2I]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # interleaved columns
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            activated = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))  # [t, I]
            expert_out = activated @ down_weight + self.down_proj_bias[expert]  # [t, H]
            weighted = expert_out * routing_weights[token_index, top_k_position, None]
            output.index_add_(0, token_index, weighted.to(hidden_states.dtype))
        return output


class _GptOssTrunk(nn.Module):
    """Embeddings and the first `num_layers` decoder layers, named like transformers' `GptOssModel` (no final norm)."""

    def __init__(self, config: GptOssConfig, num_layers: int, mxfp4: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([GptOssDecoderLayer(config, index) for index in range(num_layers)])
        for layer in self.layers:
            layer.mlp.experts = LensGptOssExperts(config, mxfp4)
        # No final `norm` (and no `lm_head`): the features are taken before it, so it is never built or loaded.


class LensGptOssEncoder(nn.Module):
    """Text features from GPT-OSS: the outputs of `selected_layers` (before the final norm), nothing more.

    State-dict names follow the official `text_encoder/` checkpoint (`model.layers.N...`); layers after the last
    selected one and `lm_head` are never built or loaded.
    """

    def __init__(self, config: GptOssConfig, selected_layers: tuple[int, ...] = (5, 11, 17, 23), mxfp4: bool = True):
        super().__init__()
        selected_layers = tuple(int(i) for i in selected_layers)
        if not selected_layers or min(selected_layers) < 0 or max(selected_layers) >= config.num_hidden_layers:
            raise ValueError(
                f"selected layers {list(selected_layers)} must lie in 0..{config.num_hidden_layers - 1} "
                f"(the encoder has {config.num_hidden_layers} layers)."
            )
        config._attn_implementation = "eager"  # GPT-OSS's attention sinks are not supported by SDPA in transformers
        self.config = config
        self.selected_layers = selected_layers
        self.model = _GptOssTrunk(config, max(selected_layers) + 1, mxfp4)
        self.rotary_emb = GptOssRotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        selected_layers: tuple[int, ...] = (5, 11, 17, 23),
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> LensGptOssEncoder:
        """Load the official `text_encoder/` folder (MXFP4 or dense experts), casting float weights to `torch_dtype`."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{folder} is not a GPT-OSS text encoder folder: config.json is missing.")
        raw_config = json.loads(config_path.read_text())
        config = GptOssConfig.from_dict({k: v for k, v in raw_config.items() if k != "quantization_config"})
        mxfp4 = (raw_config.get("quantization_config") or {}).get("quant_method") == "mxfp4"
        with torch.device("meta"):
            encoder = cls(config, selected_layers, mxfp4=mxfp4)
        encoder.rotary_emb = GptOssRotaryEmbedding(config)  # its buffers are computed, not stored
        keep = max(encoder.selected_layers)
        expected = set(encoder.state_dict())
        loaded = {}
        for name, tensor in iter_checkpoint_tensors(folder):
            if not name.startswith(("model.", "lm_head.")):
                name = "model." + name  # saved from a bare GptOssModel, without the causal-LM wrapper
            if name.startswith("model.layers."):
                if int(name.split(".")[2]) > keep:
                    continue
            elif name not in expected:
                continue  # lm_head: not needed for features
            if name not in expected:
                raise ValueError(f"Unexpected tensor {name!r} in {folder}: is this a GPT-OSS checkpoint?")
            if tensor.is_floating_point():
                is_fp32_module = any(f".{part}." in f".{name}" for part in FP32_MODULE_NAMES)
                tensor = tensor.to(torch.float32 if is_fp32_module else torch_dtype)
            loaded[name] = tensor.to(device)
        missing = sorted(expected - set(loaded))
        if missing:
            raise ValueError(f"The text encoder in {folder} is missing {len(missing)} tensors, e.g. {missing[:3]}.")
        encoder.load_state_dict(loaded, assign=True, strict=True)
        encoder.rotary_emb.to(device)
        return encoder.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """input_ids, attention_mask: [B, S] -> one [B, S, hidden] tensor per selected layer, in layer order."""
        inputs_embeds = self.model.embed_tokens(input_ids)  # [B, S, H]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, S]
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "past_key_values": None}
        masks = {
            "full_attention": create_causal_mask(**mask_kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs),
        }
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        features = {}
        for index, layer in enumerate(self.model.layers):
            layer_device = layer.input_layernorm.weight.device
            hidden_states = layer(
                hidden_states.to(layer_device),
                attention_mask=_to(masks[self.config.layer_types[index]], layer_device),
                position_ids=position_ids.to(layer_device),
                position_embeddings=tuple(t.to(layer_device) for t in position_embeddings),
            )
            if index in self.selected_layers:
                features[index] = hidden_states
        return [features[index] for index in self.selected_layers]


def _to(mask, device):
    return mask.to(device) if isinstance(mask, torch.Tensor) else mask
