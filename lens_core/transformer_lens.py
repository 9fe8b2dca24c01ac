"""`LensTransformer2DModel`: the Lens dual-stream MMDiT denoiser (LENS_SPEC section 2).

Parameter names match the official checkpoint (and the Comfy-Org single files), so the official float32 shards load
with no key conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import nn

ROPE_THETA = 10000.0
BLOCK_NORM_EPS = 1e-6
TEXT_NORM_EPS = 1e-5
MLP_HIDDEN_RATIO = 8 / 3  # int(1536 / 3 * 8) = 4096 for the real model


def lens_mlp_hidden_dim(inner_dim: int) -> int:
    """Hidden width of the SwiGLU MLPs, as the official code computes it."""
    return int(inner_dim / 3 * 8)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (section 2.1)
# ----------------------------------------------------------------------------------------------------------------


def rope_frequencies(positions: torch.Tensor, axes_dims: Sequence[int], theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotation angles for 3-axis positions.

    positions: [S, 3] (frame, height, width) -> angles [S, sum(axes_dims) / 2] in float32, blocks ordered by axis.
    """
    angles = []
    for axis, dim in enumerate(axes_dims):
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim  # [dim/2]
        inverse_frequency = 1.0 / (theta**exponents)  # [dim/2]
        angles.append(positions[:, axis].to(torch.float32)[:, None] * inverse_frequency[None, :])  # [S, dim/2]
    return torch.cat(angles, dim=-1)  # [S, head_dim/2]


def lens_rope_positions(height_tokens: int, width_tokens: int, text_length: int, device=None):
    """Image positions (centred grid, raster order) and text positions (one scalar per token on all three axes).

    Returns ([h*w, 3], [text_length, 3]) int64.
    """
    rows = torch.arange(height_tokens, device=device) - (height_tokens - height_tokens // 2)  # [h]
    cols = torch.arange(width_tokens, device=device) - (width_tokens - width_tokens // 2)  # [w]
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each
    image = torch.stack([torch.zeros_like(grid_rows), grid_rows, grid_cols], dim=-1).reshape(-1, 3)  # [h*w, 3]
    start = max(height_tokens // 2, width_tokens // 2)
    text = (start + torch.arange(text_length, device=device))[:, None].expand(-1, 3)  # [S_txt, 3]
    return image, text


class RopeTables(NamedTuple):
    """Rotations for one sequence, computed once per forward and shared by every block (all float32).

    `rotations`: [S, head_dim/2] complex64, one unit complex number per adjacent channel pair; `cos`, `sin`:
    [S, head_dim], each angle repeated for both channels of its pair, `sin` with the sign of the pair's first channel
    folded in (-sin, +sin), for the real-valued formulation used under `torch.compile`.
    """

    rotations: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def rope_tables(angles: torch.Tensor) -> RopeTables:
    """Angles [S, head_dim/2] -> the complex and real rotation tables."""
    angles = angles.to(torch.float32)
    cos, sin = angles.cos(), angles.sin()  # [S, head_dim/2]
    rotations = torch.complex(cos, sin)  # [S, head_dim/2]
    return RopeTables(rotations, cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2))


def apply_rope(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) as complex numbers, in float32.

    x: [B, S, heads, head_dim]. Eager: one complex multiply (several times faster on CPU than the real-valued
    pairs, see BENCHMARKS.md). Under `torch.compile`, whose code generator has no complex kernels, the same
    rotation written as x * cos + swap_pairs(x) * sin, which it fuses. Both equal the spec's rotation to float32
    rounding (tests/lens_core/test_diffusers_conventions.py).
    """
    x32 = x.to(torch.float32)
    if torch.compiler.is_compiling():
        swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
        rotated = x32 * rope.cos[None, :, None, :] + swapped * rope.sin[None, :, None, :]
        return rotated.to(x.dtype)
    pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)).contiguous())  # [B, S, heads, head_dim/2]
    rotated = torch.view_as_real(pairs * rope.rotations[None, :, None, :])  # [B, S, heads, head_dim/2, 2]
    return rotated.flatten(-2).to(x.dtype)  # [B, S, heads, head_dim]


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


class LensFeedForward(nn.Module):
    """SwiGLU MLP without biases: w2(SiLU(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# Backends of diffusers' dispatcher that take a tensor `attn_mask` laid out [B, 1, 1, S_keys]. Any other backend
# (flash, sage, xformers, ...) gets no mask: a batch with padded text is then attended sample by sample over its
# valid keys only, which is the same result.
MASKED_ATTENTION_BACKENDS = frozenset(
    {AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH, AttentionBackendName._NATIVE_EFFICIENT}
)


def _active_backend(backend: AttentionBackendName | None) -> AttentionBackendName:
    """The backend a dispatch with `backend` runs: the processor's own, else diffusers' active one (env / context)."""
    return backend if backend is not None else _AttentionBackendRegistry.get_active_backend()[0]


class LensAttnProcessor:
    """Lens joint attention on diffusers' attention dispatcher, so `transformer.set_attention_backend("flash")`
    (or "sage", "_native_math", ...) switches the kernel. The default (native SDPA) computes exactly what the plain
    `F.scaled_dot_product_attention` call did.

    Per stream: fused QKV -> RMSNorm of q and k over head_dim -> RoPE; the joint sequence is image tokens first, then
    text; the output is split back and projected per stream.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: LensJointAttention,
        image: torch.Tensor,
        text: torch.Tensor,
        image_rope: RopeTables,
        text_rope: RopeTables,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, S_img, D], text [B, S_txt, D]; attention_mask [B, S_img + S_txt] bool (True = key is attended) or
        None (every key valid). Returns the image and text attention outputs, [B, S_img, D] and [B, S_txt, D]."""
        img_q, img_k, img_v = attn.project(image, attn.img_qkv, attn.norm_q, attn.norm_k, image_rope)
        txt_q, txt_k, txt_v = attn.project(text, attn.txt_qkv, attn.norm_added_q, attn.norm_added_k, text_rope)
        query = torch.cat([img_q, txt_q], dim=1)  # [B, S, heads, head_dim], image first
        key = torch.cat([img_k, txt_k], dim=1)
        value = torch.cat([img_v, txt_v], dim=1)
        out = self._attend(query, key, value, attention_mask)  # [B, S, heads, head_dim]
        out = out.flatten(2).to(image.dtype)  # [B, S, D]
        image_length = image.shape[1]
        return attn.to_out[0](out[:, :image_length]), attn.to_add_out(out[:, image_length:])

    def _attend(self, query, key, value, key_valid: torch.Tensor | None) -> torch.Tensor:
        backend, parallel = self._attention_backend, self._parallel_config
        if key_valid is None:
            return dispatch_attention_fn(query, key, value, backend=backend, parallel_config=parallel)
        if _active_backend(backend) in MASKED_ATTENTION_BACKENDS:
            mask = key_valid[:, None, None, :]  # [B, 1, 1, S]: masks keys only, padded text queries still compute
            return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend, parallel_config=parallel)
        outputs = []
        for index in range(query.shape[0]):
            valid = key_valid[index]  # [S]
            outputs.append(
                dispatch_attention_fn(
                    query[index : index + 1],
                    key[index : index + 1, valid],
                    value[index : index + 1, valid],
                    backend=backend,
                    parallel_config=parallel,
                )
            )
        return torch.cat(outputs)


class LensJointAttention(nn.Module, AttentionModuleMixin):
    """Joint attention over image tokens followed by text tokens, with per-stream fused QKV and output projections.

    The computation lives in the processor (`LensAttnProcessor` by default), as in diffusers' attention modules.
    """

    _default_processor_cls = LensAttnProcessor
    _available_processors = [LensAttnProcessor]
    _supports_qkv_fusion = False  # the checkpoint already stores fused QKV projections

    def __init__(self, dim: int, num_heads: int, head_dim: int, processor=None):
        super().__init__()
        self.heads = num_heads
        self.head_dim = head_dim
        self.img_qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.txt_qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.norm_q = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.norm_k = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.norm_added_q = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.norm_added_k = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(num_heads * head_dim, dim)])
        self.to_add_out = nn.Linear(num_heads * head_dim, dim)
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def project(self, x, projection, norm_q, norm_k, rope: RopeTables):
        """One stream's rotated queries and keys and its values, each [B, S, heads, head_dim]."""
        qkv = projection(x).unflatten(-1, (3, self.heads, self.head_dim))  # [B, S, 3, heads, head_dim]
        query, key, value = qkv.unbind(dim=2)  # [B, S, heads, head_dim] each
        return apply_rope(norm_q(query), rope), apply_rope(norm_k(key), rope), value

    def forward(self, image, text, image_rope, text_rope, attention_mask=None):
        """image [B, S_img, D], text [B, S_txt, D], rope tables, key mask [B, S_img + S_txt] bool or None."""
        return self.processor(self, image, text, image_rope, text_rope, attention_mask)


def _modulation(dim: int) -> nn.Sequential:
    # Index 0 is a parameter-free SiLU, so the weights are named `*_mod.1.weight` as in the official checkpoint.
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


class LensTransformerBlock(nn.Module):
    """One dual-stream block: separate norms, modulation and MLPs per stream, joint attention."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int):
        super().__init__()
        self.attn = LensJointAttention(dim, num_heads, head_dim)
        self.img_mod = _modulation(dim)
        self.txt_mod = _modulation(dim)
        self.img_norm1 = RMSNorm(dim, eps=BLOCK_NORM_EPS)
        self.img_norm2 = RMSNorm(dim, eps=BLOCK_NORM_EPS)
        self.txt_norm1 = RMSNorm(dim, eps=BLOCK_NORM_EPS)
        self.txt_norm2 = RMSNorm(dim, eps=BLOCK_NORM_EPS)
        self.img_mlp = LensFeedForward(dim, mlp_hidden_dim)
        self.txt_mlp = LensFeedForward(dim, mlp_hidden_dim)

    def forward(self, image, text, temb, image_rope, text_rope, attention_mask):
        # Each [B, 1, D]: shift1, scale1, gate1, shift2, scale2, gate2.
        img_mod = self.img_mod(temb).unsqueeze(1).chunk(6, dim=-1)
        txt_mod = self.txt_mod(temb).unsqueeze(1).chunk(6, dim=-1)
        img_in = self.img_norm1(image) * (1 + img_mod[1]) + img_mod[0]
        txt_in = self.txt_norm1(text) * (1 + txt_mod[1]) + txt_mod[0]
        img_attn, txt_attn = self.attn(img_in, txt_in, image_rope, text_rope, attention_mask)
        image = image + img_mod[2] * img_attn
        text = text + txt_mod[2] * txt_attn
        image = image + img_mod[5] * self.img_mlp(self.img_norm2(image) * (1 + img_mod[4]) + img_mod[3])
        text = text + txt_mod[5] * self.txt_mlp(self.txt_norm2(text) * (1 + txt_mod[4]) + txt_mod[3])
        return image, text


class LensTimestepEmbedding(nn.Module):
    """Sinusoidal timestep features ([cos | sin], 256 channels, argument t * 1000 * freq) -> MLP. No pooled text."""

    def __init__(self, dim: int, num_channels: int = 256):
        super().__init__()
        self.time_proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(num_channels, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The official code casts the timestep to the model dtype first (in bf16 this quantizes it).
        features = self.time_proj(timestep.to(dtype)).to(dtype)  # [B, 256]
        return self.timestep_embedder(features)  # [B, D]


class LensOutputNorm(nn.Module):
    """Final adaptive LayerNorm. Its modulation splits scale first, then shift (the opposite of the blocks)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, D] each
        return self.norm(x) * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def _grid_from_img_shapes(img_shapes, batch_size: int) -> tuple[int, int]:
    """Accept (1, h, w), a list of those (one per sample), or diffusers' list of lists; all must agree."""
    if isinstance(img_shapes, (tuple, list)) and len(img_shapes) == 3 and all(isinstance(v, int) for v in img_shapes):
        shapes = [tuple(img_shapes)]
    else:
        shapes = []
        for item in img_shapes:
            if isinstance(item, list):
                shapes.extend(tuple(s) for s in item)
            else:
                shapes.append(tuple(item))
    if not shapes or any(s != shapes[0] for s in shapes):
        raise ValueError(f"img_shapes must describe one latent grid (1, h, w) for the whole batch, got {img_shapes!r}.")
    frames, height, width = shapes[0]
    if frames != 1:
        raise ValueError(f"Lens generates single images: the frame count in img_shapes must be 1, got {frames}.")
    return int(height), int(width)


class LensTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """The Lens denoiser: a dual-stream MMDiT that predicts the flow velocity of packed FLUX.2 latents.

    The `__init__` arguments are the official `config.json` keys. Attention runs through diffusers' dispatcher:
    `set_attention_backend("flash")` / `("sage")` / `("native")` switch kernels, `attn_processors` and
    `set_attn_processor` work as on diffusers' own models.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LensTransformerBlock"]
    _skip_layerwise_casting_patterns = ["time_text_embed", "norm", "rope"]
    # Kept in bf16 when quantizing: quantized modulation layers cause grid artifacts (LENS_SPEC section 9).
    _keep_in_high_precision_patterns = ["img_mod", "txt_mod", "time_text_embed", "norm_out.linear"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 128,
        out_channels: int = 32,
        num_layers: int = 48,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        inner_dim: int | None = 1536,
        enc_hidden_dim: int = 2880,
        axes_dims_rope: Sequence[int] = (8, 28, 28),
        gate_mlp: bool = True,
        rms_norm: bool = True,
        multi_layer_encoder_feature: bool = True,
        selected_layer_index: Sequence[int] = (5, 11, 17, 23),
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if inner_dim is not None and inner_dim != dim:
            raise ValueError(f"inner_dim ({inner_dim}) must equal num_attention_heads x attention_head_dim ({dim}).")
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}."
            )
        if not (gate_mlp and rms_norm and multi_layer_encoder_feature):
            raise ValueError(
                "Lens checkpoints use gate_mlp, rms_norm and multi_layer_encoder_feature; other values are not supported."
            )
        num_text_layers = len(selected_layer_index)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_norm = nn.ModuleList([RMSNorm(enc_hidden_dim, eps=TEXT_NORM_EPS) for _ in range(num_text_layers)])
        self.txt_in = nn.Linear(enc_hidden_dim * num_text_layers, dim)
        self.time_text_embed = LensTimestepEmbedding(dim)
        mlp_hidden = lens_mlp_hidden_dim(dim)
        self.transformer_blocks = nn.ModuleList(
            [LensTransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_hidden) for _ in range(num_layers)]
        )
        self.norm_out = LensOutputNorm(dim)
        # Packed latent channels out: out_channels VAE channels x patch x patch (32 x 2 x 2 = 128 for the real model).
        self.proj_out = nn.Linear(dim, out_channels * patch_size * patch_size)
        self.gradient_checkpointing = False

    def _check_text_inputs(self, encoder_hidden_states, encoder_hidden_states_mask, batch_size):
        expected_layers = len(self.config.selected_layer_index)
        if not isinstance(encoder_hidden_states, (list, tuple)) or len(encoder_hidden_states) != expected_layers:
            got = (
                len(encoder_hidden_states)
                if isinstance(encoder_hidden_states, (list, tuple))
                else type(encoder_hidden_states).__name__
            )
            raise ValueError(
                f"encoder_hidden_states must be a list of {expected_layers} tensors (one per selected encoder layer), got {got}."
            )
        shape = encoder_hidden_states[0].shape
        for layer in encoder_hidden_states:
            if (
                layer.ndim != 3
                or layer.shape != shape
                or layer.shape[-1] != self.config.enc_hidden_dim
                or layer.shape[0] != batch_size
            ):
                raise ValueError(
                    f"each text feature tensor must be [B={batch_size}, S_txt, {self.config.enc_hidden_dim}] with one shared shape, "
                    f"got {[tuple(t.shape) for t in encoder_hidden_states]}."
                )
        if encoder_hidden_states_mask is not None and tuple(encoder_hidden_states_mask.shape) != tuple(shape[:2]):
            raise ValueError(
                f"encoder_hidden_states_mask must be [B, S_txt] = {tuple(shape[:2])}, got {tuple(encoder_hidden_states_mask.shape)}."
            )

    def _key_mask(self, encoder_hidden_states_mask, batch_size: int, image_length: int, text_length: int, device):
        """Which keys attention may use: image keys always, text keys where the mask is True. [B, S_img + S_txt] bool,
        or None when every key is valid (then kernels without mask support, like flash, can run as they are)."""
        if encoder_hidden_states_mask is None:
            return None
        text_valid = encoder_hidden_states_mask.to(device=device, dtype=torch.bool)  # [B, S_txt]
        if bool(text_valid.all()):
            return None
        image_valid = torch.ones(batch_size, image_length, dtype=torch.bool, device=device)
        return torch.cat([image_valid, text_valid], dim=1)

    def _check_inputs(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes):
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be packed image tokens [B, h*w, {self.config.in_channels}] (in_channels), "
                f"got {tuple(hidden_states.shape)}."
            )
        for name, value in (
            ("encoder_hidden_states", encoder_hidden_states),
            ("timestep", timestep),
            ("img_shapes", img_shapes),
        ):
            if value is None:
                raise ValueError(f"{name} is required (only encoder_hidden_states_mask may be None: all text valid).")
        self._check_text_inputs(encoder_hidden_states, encoder_hidden_states_mask, hidden_states.shape[0])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: list[torch.Tensor] | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes=None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        """Predict the velocity.

        hidden_states: packed image tokens [B, h*w, in_channels]; encoder_hidden_states: one tensor
        [B, S_txt, enc_hidden_dim] per selected encoder layer; encoder_hidden_states_mask: [B, S_txt] bool, True = real
        token (None = all real); timestep: [B] (or scalar) in sigma units 0..1; img_shapes: the latent grid (1, h, w)
        (or one per sample). `attention_kwargs` is accepted for diffusers compatibility and not used.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes)
        batch_size, image_length, _ = hidden_states.shape
        height_tokens, width_tokens = _grid_from_img_shapes(img_shapes, batch_size)
        if height_tokens * width_tokens != image_length:
            raise ValueError(
                f"img_shapes grid {height_tokens}x{width_tokens} does not match {image_length} image tokens."
            )
        # The timestep MLP is never quantized, so its weights carry the compute dtype.
        dtype = self.time_text_embed.timestep_embedder.linear_1.weight.dtype
        text_length = encoder_hidden_states[0].shape[1]
        device = hidden_states.device

        # 1. Key mask (masks keys only: padded text queries still compute). [B, S_img + S_txt] bool or None
        attention_mask = self._key_mask(encoder_hidden_states_mask, batch_size, image_length, text_length, device)

        # 2-4. Inputs: image tokens, timestep embedding, normalised and concatenated text layers.
        image = self.img_in(hidden_states.to(dtype))  # [B, S_img, D]
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        temb = self.time_text_embed(timestep.to(device), dtype)  # [B, D]
        text_layers = [norm(layer.to(dtype)) for norm, layer in zip(self.txt_norm, encoder_hidden_states)]
        text = self.txt_in(torch.cat(text_layers, dim=-1).to(dtype))  # [B, S_txt, D]

        # 5. RoPE tables, float32, shared by every block. [S, head_dim/2] complex (+ real forms)
        image_positions, text_positions = lens_rope_positions(height_tokens, width_tokens, text_length, device)
        image_rope = rope_tables(rope_frequencies(image_positions, self.config.axes_dims_rope))
        text_rope = rope_tables(rope_frequencies(text_positions, self.config.axes_dims_rope))

        # 6. The blocks.
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                image, text = self._gradient_checkpointing_func(
                    block, image, text, temb, image_rope, text_rope, attention_mask
                )
            else:
                image, text = block(image, text, temb, image_rope, text_rope, attention_mask)

        # 7. Output: adaptive LayerNorm and projection to the packed latent channels.
        output = self.proj_out(self.norm_out(image, temb))  # [B, S_img, out_channels * patch^2]
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
