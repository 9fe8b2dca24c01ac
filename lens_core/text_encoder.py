"""`LensGptOssEncoder`: GPT-OSS-20B as a text-feature extractor (LENS_SPEC section 3).

The features are the residual stream *output by* decoder layers 5, 11, 17 and 23 (before the final norm), so the
encoder stops after the last needed layer and never runs `lm_head`. Expert weights stay in their MXFP4 bytes as ordinary
tensors and are dequantized one expert at a time on whatever device the layer is on, in plain PyTorch: no triton, no
`kernels` package, and never a silent 41.8 GB bf16 copy.

The attention, norms and router come from transformers' GPT-OSS implementation; only the experts are ours.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn
from transformers import GptOssConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssDecoderLayer,
    GptOssPreTrainedModel,
    GptOssRotaryEmbedding,
)

from .atomic_io import atomic_write_text
from .loading import HUB_DOWNLOAD_KWARGS, REFUSED_LOAD_KWARGS, resolve_component_folder
from .presets import TEXT_FEATURE_LAYERS
from .safetensors_io import checkpoint_files, iter_checkpoint_tensors, parse_size, save_sharded

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
# The official text_encoder/config.json's quantization_config: experts MXFP4, everything else bf16.
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
_SAFETENSORS_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "F32": 4,
    "I64": 8,
    "F64": 8,
}


# transformers renamed the masks' `past_key_values` argument to `cache` during 5.x; use whichever this version has.
_CACHE_KEYWORD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# Byte -> its two FP4 values (low nibble = even element, high nibble = odd element), and scale byte -> 2^(s - 127).
_BYTE_CODES = torch.stack([torch.arange(256) & 0x0F, torch.arange(256) >> 4], dim=-1)  # [256, 2]
_FP4_MAGNITUDE_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # rounding thresholds between FP4 magnitudes


@functools.cache
def _mxfp4_tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The value of each byte's two FP4 codes ([256, 2]) and of each scale byte ([256]), made once per dtype and
    device (the streaming modes dequantize about 1,500 experts per prompt)."""
    byte_values = torch.tensor(FP4_VALUES, dtype=dtype, device=device)[_BYTE_CODES.to(device)]
    scale_values = torch.exp2(torch.arange(256, dtype=torch.float32, device=device) - 127).to(dtype)
    return byte_values, scale_values


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 bytes -> dense weights in the layout `x @ W` uses.

    blocks: [..., out, G, 16] uint8 (two codes per byte, low nibble first); scales: [..., out, G] uint8 (2^(s - 127)).
    Returns [..., in = G * 32, out] (a transposed view of [..., out, in]). Exact: an FP4 value times a power of two.
    One table lookup per byte (both nibbles at once) and one per scale byte: about twice as fast on CPU as two
    nibble lookups and `ldexp` (BENCHMARKS.md).
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match.")
    byte_values, scale_values = _mxfp4_tables(dtype, blocks.device)
    values = byte_values[blocks.to(torch.uint8).long()].flatten(-2)  # [..., out, G, 16, 2] -> [..., out, G, 32]
    values = values * scale_values[scales.long()][..., None]  # [..., out, G, 32]
    return values.flatten(-2).transpose(-1, -2)  # [..., in, out]


def quantize_mxfp4(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weights [..., in, out] (the `x @ W` layout) -> MXFP4 (blocks [..., out, G, 16], scales [..., out, G]).

    The OCP MX recipe: per block of 32 inputs the shared exponent is floor(log2(max |w|)) - 2 (FP4's largest value is
    1.5 x 2^2), values round to the nearest FP4 magnitude. `dequantize_mxfp4` of the result is the rounded weights;
    quantizing weights that are already MXFP4 values gives them back exactly.
    """
    rows = weights.transpose(-1, -2).to(torch.float32).contiguous()  # [..., out, in]
    if rows.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the input size to be a multiple of {MXFP4_BLOCK}, got {rows.shape[-1]}.")
    groups = rows.unflatten(-1, (-1, MXFP4_BLOCK))  # [..., out, G, 32]
    largest = groups.abs().amax(dim=-1, keepdim=True)  # [..., out, G, 1]
    exponent = (torch.floor(torch.log2(largest.clamp_min(2.0**-125))) - 2).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)  # [..., out, G, 32], magnitudes up to 8 (rounded down to 6)
    midpoints = torch.tensor(_FP4_MAGNITUDE_MIDPOINTS, device=weights.device)
    codes = torch.bucketize(scaled.abs(), midpoints) + 8 * (scaled < 0)  # [..., out, G, 32] in 0..15
    codes = codes.to(torch.uint8).unflatten(-1, (16, 2))  # [..., out, G, 16, 2]
    blocks = codes[..., 0] | (codes[..., 1] << 4)  # [..., out, G, 16]
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


class LensGptOssExperts(nn.Module):
    """GPT-OSS experts that keep MXFP4 weights as bytes (or plain dense weights) and dequantize per expert.

    Same call as transformers' `GptOssExperts`: (hidden [T, H], router_indices [T, k], routing_weights [T, k]).
    `keep_dequantized()` additionally holds every expert dense (non-persistent buffers, so saving still writes the
    MXFP4 bytes): no dequantization per call, for memory modes with room to spare.
    """

    def __init__(self, config: GptOssConfig, mxfp4: bool):
        super().__init__()
        experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.mxfp4 = experts, mxfp4
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        if mxfp4:
            groups_in, groups_inter = hidden // MXFP4_BLOCK, inter // MXFP4_BLOCK
            self.register_buffer(
                "gate_up_proj_blocks", torch.empty(experts, 2 * inter, groups_in, 16, dtype=torch.uint8)
            )
            self.register_buffer("gate_up_proj_scales", torch.empty(experts, 2 * inter, groups_in, dtype=torch.uint8))
            self.register_buffer("down_proj_blocks", torch.empty(experts, hidden, groups_inter, 16, dtype=torch.uint8))
            self.register_buffer("down_proj_scales", torch.empty(experts, hidden, groups_inter, dtype=torch.uint8))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, hidden, 2 * inter))
            self.down_proj = nn.Parameter(torch.empty(experts, inter, hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * inter))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))
        # Dense copies held by keep_dequantized(): [E, out, in], the storage layout dequantize_mxfp4 produces.
        self.register_buffer("dense_gate_up", None, persistent=False)
        self.register_buffer("dense_down", None, persistent=False)

    def dense_num_bytes(self, dtype: torch.dtype) -> int:
        """What keep_dequantized(dtype) adds (0 for dense experts, which have nothing to dequantize)."""
        if not self.mxfp4:
            return 0
        elements = (self.gate_up_proj_blocks.numel() + self.down_proj_blocks.numel()) * 2
        return elements * torch.empty((), dtype=dtype).element_size()

    def keep_dequantized(self, dtype: torch.dtype) -> None:
        """Dequantize every expert once, on the device the bytes are on, and keep the dense weights."""
        if not self.mxfp4 or (self.dense_gate_up is not None and self.dense_gate_up.dtype == dtype):
            return
        self.dense_gate_up = dequantize_mxfp4(self.gate_up_proj_blocks, self.gate_up_proj_scales, dtype).transpose(
            -1, -2
        )
        self.dense_down = dequantize_mxfp4(self.down_proj_blocks, self.down_proj_scales, dtype).transpose(-1, -2)

    def release_dequantized(self) -> None:
        """Drop the dense copies (back to dequantizing per call)."""
        self.dense_gate_up = None
        self.dense_down = None

    def expert_weights(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (gate_up [H, 2I], down [I, H]) for one expert, on the device the weights are on."""
        if not self.mxfp4:
            return self.gate_up_proj[index].to(dtype), self.down_proj[index].to(dtype)
        if self.dense_gate_up is not None:
            # Same memory layout as the per-call path (a transposed [out, in] matrix), so the same matmul kernel runs
            # and the results are bit-identical.
            return self.dense_gate_up[index].to(dtype).T, self.dense_down[index].to(dtype).T
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
        self.layers = nn.ModuleList([_decoder_layer(config, index, mxfp4) for index in range(num_layers)])
        # No final `norm` (and no `lm_head`): the features are taken before it, so it is never built or loaded.


def _decoder_layer(config: GptOssConfig, index: int, mxfp4: bool) -> GptOssDecoderLayer:
    """transformers' decoder layer with our experts. It is built on the meta device and then placed, so its dense
    bf16/fp32 experts (2 GB per real layer) are never allocated only to be thrown away."""
    device = torch.empty(()).device  # the ambient default device (meta inside from_pretrained)
    with torch.device("meta"):
        layer = GptOssDecoderLayer(config, index)
        layer.mlp.experts = LensGptOssExperts(config, mxfp4)
    return layer if device.type == "meta" else layer.to_empty(device=device)


def _is_mxfp4(config) -> bool:
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return quantization.get("quant_method") == "mxfp4"


class LensGptOssEncoder(GptOssPreTrainedModel):
    """Text features from GPT-OSS: the outputs of `selected_layers` (before the final norm), nothing more.

    A transformers model: `LensGptOssEncoder(config)` builds it with initialised weights (`post_init`),
    `from_pretrained` loads the official `text_encoder/` folder and `save_pretrained` writes one (MXFP4 expert bytes
    kept as they are). State-dict names follow the official checkpoint (`model.layers.N...`); layers after the last
    selected one, the final norm and `lm_head` are never built or loaded (saving copies them from the source folder).

    `selected_layers` defaults to `config.lens_selected_layers`, else the real model's layers (5, 11, 17, 23);
    `mxfp4` (experts as MXFP4 bytes, else dense) defaults to what `config.quantization_config` says.
    """

    _keep_in_fp32_modules = list(FP32_MODULE_NAMES)

    def __init__(self, config: GptOssConfig, selected_layers: Sequence[int] | None = None, mxfp4: bool | None = None):
        config = copy.deepcopy(config)
        config._attn_implementation = "eager"  # GPT-OSS's attention sinks are not supported by SDPA in transformers
        super().__init__(config)
        if selected_layers is None:
            selected_layers = getattr(config, "lens_selected_layers", None) or TEXT_FEATURE_LAYERS
        selected_layers = tuple(int(i) for i in selected_layers)
        if not selected_layers or min(selected_layers) < 0 or max(selected_layers) >= config.num_hidden_layers:
            raise ValueError(
                f"selected layers {list(selected_layers)} must lie in 0..{config.num_hidden_layers - 1} "
                f"(the encoder has {config.num_hidden_layers} layers); pass selected_layers= or set "
                "config.lens_selected_layers."
            )
        self.config.lens_selected_layers = list(selected_layers)  # saved with the config, read back on load
        self.selected_layers = selected_layers
        self.mxfp4 = _is_mxfp4(config) if mxfp4 is None else bool(mxfp4)
        self.model = _GptOssTrunk(config, max(selected_layers) + 1, self.mxfp4)
        self.rotary_emb = GptOssRotaryEmbedding(config)
        # Set by from_pretrained: saving copies the tensors this encoder does not hold and keeps the source's config.
        self.source_folder: Path | None = None
        self.source_variant: str | None = None
        self.source_quantization_config: dict | None = None
        self.source_architectures: list[str] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' GPT-OSS initialisation, plus our experts: normal(0, initializer_range) weights (quantized to
        MXFP4 for byte experts) and zero biases."""
        super()._init_weights(module)
        if not isinstance(module, LensGptOssExperts):
            return
        std = self.config.initializer_range
        with torch.no_grad():
            module.gate_up_proj_bias.zero_()
            module.down_proj_bias.zero_()
            if not module.mxfp4:
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
                return
            for kind in ("gate_up_proj", "down_proj"):
                blocks = getattr(module, f"{kind}_blocks")
                out_features, in_features = blocks.shape[1], blocks.shape[2] * MXFP4_BLOCK
                dense = torch.randn(module.num_experts, in_features, out_features, device=blocks.device) * std
                new_blocks, new_scales = quantize_mxfp4(dense)
                blocks.copy_(new_blocks)
                getattr(module, f"{kind}_scales").copy_(new_scales)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # -------------------------------------------------------------------------------------------------------------
    # Dense experts
    # -------------------------------------------------------------------------------------------------------------

    def experts(self) -> list[LensGptOssExperts]:
        return [layer.mlp.experts for layer in self.model.layers]

    def keep_dequantized_experts(self, max_bytes: int | None = None) -> int:
        """Hold the experts dense, layer by layer in order while the total stays within `max_bytes` (None: all), so
        encoding no longer dequantizes per call. Returns the bytes added. The MXFP4 bytes stay (saving writes them)."""
        added = 0
        for experts in self.experts():
            size = experts.dense_num_bytes(self.dtype)
            if experts.dense_gate_up is not None or size == 0:
                continue
            if max_bytes is not None and added + size > max_bytes:
                break
            experts.keep_dequantized(self.dtype)
            added += size
        kept = sum(e.dense_gate_up is not None for e in self.experts())
        logger.info(
            "Text encoder: %d of %d layers hold dense experts (+%.2f GB)", kept, len(self.model.layers), added / 1e9
        )
        return added

    def release_dequantized_experts(self) -> None:
        """Drop every dense expert copy (back to dequantizing one expert at a time per call)."""
        for experts in self.experts():
            experts.release_dequantized()

    # -------------------------------------------------------------------------------------------------------------
    # Loading and saving
    # -------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        selected_layers: Sequence[int] | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        dtype: torch.dtype | None = None,
        device_map: str | torch.device | dict | None = None,
        variant: str | None = None,
        subfolder: str | None = None,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool | None = None,
        **hub_kwargs,
    ) -> LensGptOssEncoder:
        """Load a `text_encoder/` folder (MXFP4 or dense experts) or a Hub repo (with `subfolder`), casting float
        weights to `torch_dtype` (alias `dtype`, default bf16; the norms stay float32).

        transformers' keywords: `device_map` (one device, or {"": device}), `variant` (reads `model.<variant>...`
        files), `use_safetensors` (safetensors only), `low_cpu_mem_usage` (always: weights are assigned, never
        initialised first), and the Hub's `cache_dir`, `revision`, `token`, `force_download`, `local_files_only`.
        Others are refused with the reason.
        """
        refused = {key: REFUSED_LOAD_KWARGS[key] for key in hub_kwargs if key in REFUSED_LOAD_KWARGS}
        refused = {key: why for key, why in refused.items() if hub_kwargs[key] not in (None, False)}
        unknown = sorted(set(hub_kwargs) - set(REFUSED_LOAD_KWARGS) - set(HUB_DOWNLOAD_KWARGS))
        if refused or unknown:
            reasons = [f"{key}: {why}" for key, why in refused.items()] + [
                f"{key}: not a known keyword" for key in unknown
            ]
            raise ValueError(f"LensGptOssEncoder.from_pretrained cannot take {'; '.join(reasons)}.")
        if use_safetensors is False:
            raise ValueError("use_safetensors=False: Lens text encoders are read from safetensors files only.")
        device = _single_device(device, device_map)
        dtype = _one_dtype(torch_dtype, dtype)
        download = {key: hub_kwargs[key] for key in HUB_DOWNLOAD_KWARGS if hub_kwargs.get(key) is not None}
        folder = resolve_component_folder(pretrained_model_name_or_path, subfolder, download)
        encoder = cls._load_folder(folder, selected_layers, dtype, device, variant)
        return encoder

    @classmethod
    def _load_folder(cls, folder: Path, selected_layers, dtype: torch.dtype, device, variant) -> LensGptOssEncoder:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{folder} is not a GPT-OSS text encoder folder: config.json is missing.")
        raw_config = json.loads(config_path.read_text())
        config = GptOssConfig.from_dict({k: v for k, v in raw_config.items() if k != "quantization_config"})
        mxfp4 = _is_mxfp4(SimpleNamespace(quantization_config=raw_config.get("quantization_config")))
        with torch.device("meta"):
            encoder = cls(config, selected_layers, mxfp4=mxfp4)
        encoder.rotary_emb = GptOssRotaryEmbedding(encoder.config)  # its buffers are computed, not stored
        keep = max(encoder.selected_layers)
        expected = set(encoder.state_dict())
        loaded = {}
        for name, tensor in iter_encoder_tensors(folder, variant):
            if name.startswith("model.layers.") and int(name.split(".")[2]) > keep:
                continue
            if not name.startswith("model.layers.") and name not in expected:
                continue  # lm_head and the final norm: not needed for features
            if name not in expected:
                raise ValueError(f"Unexpected tensor {name!r} in {folder}: is this a GPT-OSS checkpoint?")
            if tensor.is_floating_point():
                is_fp32_module = any(f".{part}." in f".{name}" for part in FP32_MODULE_NAMES)
                tensor = tensor.to(torch.float32 if is_fp32_module else dtype)
            loaded[name] = tensor.to(device)
        missing = sorted(expected - set(loaded))
        if missing:
            raise ValueError(f"The text encoder in {folder} is missing {len(missing)} tensors, e.g. {missing[:3]}.")
        encoder.load_state_dict(loaded, assign=True, strict=True)
        encoder.rotary_emb.to(device)
        encoder.source_folder, encoder.source_variant = folder, variant
        encoder.source_quantization_config = raw_config.get("quantization_config")
        encoder.source_architectures = raw_config.get("architectures")
        return encoder.eval().requires_grad_(False)

    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        max_shard_size: int | str = "5GB",
        variant: str | None = None,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write an official-layout `text_encoder/` folder: config.json (with the MXFP4 `quantization_config`),
        generation_config.json and safetensors shards with an index. Expert weights are written as their MXFP4 bytes
        (never a dense copy); tensors this encoder does not hold (later layers, final norm, lm_head) are copied
        unchanged from the folder it was loaded from, so the saved folder is the full GPT-OSS again."""
        if state_dict is not None or push_to_hub or not safe_serialization:
            raise ValueError(
                "LensGptOssEncoder.save_pretrained writes its own safetensors shards: state_dict=, push_to_hub=True "
                "and safe_serialization=False are not supported (upload the folder with huggingface_hub afterwards)."
            )
        unknown = sorted(set(kwargs) - {"token", "save_peft_format", "save_original_format"})
        if unknown:
            raise ValueError(f"LensGptOssEncoder.save_pretrained got unknown keywords {unknown}.")
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        entries, missing = self._tensors_to_save()
        if missing:
            logger.warning(
                "Saving a text encoder built without a source checkpoint: %d tensors it never held (e.g. %s) are not "
                "written; the folder has the features' layers only.",
                len(missing),
                missing[:3],
            )
        save_sharded(folder, entries, "model.safetensors", parse_size(max_shard_size), variant)
        atomic_write_text(folder / "config.json", json.dumps(self._config_to_save(), indent=2, sort_keys=True) + "\n")
        atomic_write_text(folder / "generation_config.json", self._generation_config_text())

    def _config_to_save(self) -> dict:
        config = self.config.to_dict()
        config.pop("_attn_implementation_autoset", None)
        config["architectures"] = self.source_architectures or ["GptOssForCausalLM"]
        if self.mxfp4:
            config["quantization_config"] = self.source_quantization_config or dict(MXFP4_QUANTIZATION_CONFIG)
        return config

    def _generation_config_text(self) -> str:
        source = self.source_folder / "generation_config.json" if self.source_folder else None
        if source is not None and source.is_file():
            return source.read_text()
        ids = {"eos_token_id": self.config.eos_token_id, "pad_token_id": self.config.pad_token_id}
        return json.dumps({key: value for key, value in ids.items() if value is not None}, indent=2) + "\n"

    def _tensors_to_save(self):
        """(name, bytes, load) for every tensor of the folder, in name order, and the names nobody can provide."""
        held = {name: tensor for name, tensor in self.state_dict().items()}
        entries = {
            name: (tensor.numel() * tensor.element_size(), lambda t=tensor: t.detach().cpu())
            for name, tensor in held.items()
        }
        if self.source_folder is not None and self.source_folder.is_dir():
            for file in encoder_checkpoint_files(self.source_folder, self.source_variant):
                with safe_open(str(file), framework="pt") as reader:
                    for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                        if name in entries or f"model.{name}" in entries:
                            continue
                        shape, dtype = reader.get_slice(name).get_shape(), reader.get_slice(name).get_dtype()
                        size = math.prod(shape) * _SAFETENSORS_BYTES.get(dtype, 4)
                        entries[name] = (size, lambda file=file, name=name: _read_tensor(file, name))
            return [(name, *entries[name]) for name in sorted(entries)], []
        total_layers = self.config.num_hidden_layers
        missing = ["lm_head.weight", "model.norm.weight"] + [
            f"model.layers.{index}.*" for index in range(len(self.model.layers), total_layers)
        ]
        return [(name, *entries[name]) for name in sorted(entries)], missing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """input_ids, attention_mask: [B, S] -> one [B, S, hidden] tensor per selected layer, in layer order."""
        inputs_embeds = self.model.embed_tokens(input_ids)  # [B, S, H]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, S]
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            _CACHE_KEYWORD: None,
        }
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


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def encoder_checkpoint_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a text-encoder folder: `model[.variant].safetensors` or the shards named by
    `model.safetensors.index[.variant].json` (transformers' naming); without a variant, any layout
    `lens_core.safetensors_io.checkpoint_files` reads."""
    if variant is None:
        return checkpoint_files(folder)
    single, index = folder / f"model.{variant}.safetensors", folder / f"model.safetensors.index.{variant}.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / shard for shard in weight_map.values()})
    raise ValueError(f"{folder} has no text-encoder weights for variant {variant!r} ({single.name} or {index.name}).")


def iter_encoder_tensors(folder: Path, variant: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) for each tensor of a text-encoder folder; a checkpoint saved from a bare GptOssModel
    (no causal-LM wrapper) gets its `model.` prefix back."""
    for file in encoder_checkpoint_files(folder, variant):
        for name, tensor in iter_checkpoint_tensors(file):
            yield (name if name.startswith(("model.", "lm_head.")) else "model." + name), tensor


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as reader:
        return reader.get_tensor(name)


def _single_device(device, device_map) -> torch.device:
    """One device from `device` or a transformers-style `device_map` (a device, or {"": device})."""
    if device_map is not None:
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device_map = device_map[""]
        if isinstance(device_map, dict) or str(device_map) in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(
                f"device_map={device_map!r}: the encoder is placed on one device; to split it, use a memory mode "
                "('low' streams one layer at a time)."
            )
        if device is not None and torch.device(device) != torch.device(device_map):
            raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; give one of them.")
        device = device_map
    return torch.device(device if device is not None else "cpu")


def _one_dtype(torch_dtype, dtype) -> torch.dtype:
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; give one of them.")
    chosen = torch_dtype if torch_dtype is not None else dtype
    if chosen is None or chosen == "auto":
        return torch.bfloat16  # the checkpoint's own dtype for everything but the experts
    if not isinstance(chosen, torch.dtype) or not chosen.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {chosen!r}.")
    return chosen
