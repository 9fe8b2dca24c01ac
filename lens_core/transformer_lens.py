"""`LensTransformer2DModel`: the Lens dual-stream MMDiT denoiser (LENS_SPEC section 2).

Parameter names match the official checkpoint (and the Comfy-Org single files), so the official float32 shards load
with no key conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) as complex numbers, in float32.

    x: [B, S, heads, head_dim]; cos, sin: [S, head_dim/2].
    """
    x_pairs = x.to(torch.float32).unflatten(-1, (-1, 2))  # [B, S, heads, head_dim/2, 2]
    real, imag = x_pairs.unbind(-1)
    cos = cos[None, :, None, :]  # [1, S, 1, head_dim/2]
    sin = sin[None, :, None, :]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)  # [B, S, heads, hd/2, 2]
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


class LensJointAttention(nn.Module):
    """Joint attention over image tokens followed by text tokens, with per-stream fused QKV and output projections."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.img_qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.txt_qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.norm_q = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.norm_k = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.norm_added_q = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.norm_added_k = RMSNorm(head_dim, eps=BLOCK_NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(num_heads * head_dim, dim)])
        self.to_add_out = nn.Linear(num_heads * head_dim, dim)

    def _qkv(self, x, projection, norm_q, norm_k, cos, sin):
        qkv = projection(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # [B, S, 3, heads, head_dim]
        query, key, value = qkv.unbind(dim=2)  # [B, S, heads, head_dim] each
        query = apply_rope(norm_q(query), cos, sin)
        key = apply_rope(norm_k(key), cos, sin)
        return query, key, value

    def forward(self, image, text, image_rope, text_rope, attention_mask):
        """image [B, S_img, D], text [B, S_txt, D], rope (cos, sin) pairs, additive mask [B, 1, 1, S_img + S_txt]."""
        img_q, img_k, img_v = self._qkv(image, self.img_qkv, self.norm_q, self.norm_k, *image_rope)
        txt_q, txt_k, txt_v = self._qkv(text, self.txt_qkv, self.norm_added_q, self.norm_added_k, *text_rope)
        # Joint sequence: image first, then text. [B, heads, S, head_dim]
        query = torch.cat([img_q, txt_q], dim=1).transpose(1, 2)
        key = torch.cat([img_k, txt_k], dim=1).transpose(1, 2)
        value = torch.cat([img_v, txt_v], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # [B, heads, S, hd]
        out = out.transpose(1, 2).flatten(2).to(image.dtype)  # [B, S, D]
        image_length = image.shape[1]
        return self.to_out[0](out[:, :image_length]), self.to_add_out(out[:, image_length:])


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


class LensTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The Lens denoiser: a dual-stream MMDiT that predicts the flow velocity of packed FLUX.2 latents.

    The `__init__` arguments are the official `config.json` keys.
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
        # Packed latent channels out: 32 VAE channels x 2 x 2 patch = 128.
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: list[torch.Tensor],
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        img_shapes,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        """Predict the velocity.

        hidden_states: packed image tokens [B, h*w, 128]; encoder_hidden_states: 4 tensors [B, S_txt, 2880];
        encoder_hidden_states_mask: [B, S_txt] bool, True = real token (None = all real); timestep: [B] (or scalar)
        in sigma units 0..1; img_shapes: the latent grid (1, h, w) (or one per sample).
        """
        batch_size, image_length, _ = hidden_states.shape
        height_tokens, width_tokens = _grid_from_img_shapes(img_shapes, batch_size)
        if height_tokens * width_tokens != image_length:
            raise ValueError(
                f"img_shapes grid {height_tokens}x{width_tokens} does not match {image_length} image tokens."
            )
        self._check_text_inputs(encoder_hidden_states, encoder_hidden_states_mask, batch_size)
        # The timestep MLP is never quantized, so its weights carry the compute dtype.
        dtype = self.time_text_embed.timestep_embedder.linear_1.weight.dtype
        text_length = encoder_hidden_states[0].shape[1]
        device = hidden_states.device

        # 1. Additive key mask: image keys always valid, text keys where the mask is True. [B, 1, 1, S_img + S_txt]
        if encoder_hidden_states_mask is None:
            text_valid = torch.ones(batch_size, text_length, dtype=torch.bool, device=device)
        else:
            text_valid = encoder_hidden_states_mask.to(device=device, dtype=torch.bool)
        key_valid = torch.cat([torch.ones(batch_size, image_length, dtype=torch.bool, device=device), text_valid], 1)
        attention_mask = torch.zeros(key_valid.shape, dtype=dtype, device=device)
        attention_mask = attention_mask.masked_fill(~key_valid, float("-inf"))[:, None, None, :]

        # 2-4. Inputs: image tokens, timestep embedding, normalised and concatenated text layers.
        image = self.img_in(hidden_states.to(dtype))  # [B, S_img, D]
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        temb = self.time_text_embed(timestep.to(device), dtype)  # [B, D]
        text_layers = [norm(layer.to(dtype)) for norm, layer in zip(self.txt_norm, encoder_hidden_states)]
        text = self.txt_in(torch.cat(text_layers, dim=-1).to(dtype))  # [B, S_txt, D]

        # 5. RoPE angles, float32. [S, head_dim/2]
        image_positions, text_positions = lens_rope_positions(height_tokens, width_tokens, text_length, device)
        image_angles = rope_frequencies(image_positions, self.config.axes_dims_rope)
        text_angles = rope_frequencies(text_positions, self.config.axes_dims_rope)
        image_rope = (image_angles.cos(), image_angles.sin())
        text_rope = (text_angles.cos(), text_angles.sin())

        # 6. The blocks.
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                image, text = self._gradient_checkpointing_func(
                    block, image, text, temb, image_rope, text_rope, attention_mask
                )
            else:
                image, text = block(image, text, temb, image_rope, text_rope, attention_mask)

        # 7. Output: adaptive LayerNorm and projection to the packed latent channels.
        output = self.proj_out(self.norm_out(image, temb))  # [B, S_img, 128]
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
