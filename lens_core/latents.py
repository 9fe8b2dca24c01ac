"""Moving latents between the FLUX.2 VAE and the denoiser's token layout (LENS_SPEC sections 2.2 and 4)."""

from __future__ import annotations

import torch

PATCH = 2
VAE_CHANNELS = 32
PACKED_CHANNELS = VAE_CHANNELS * PATCH * PATCH  # 128


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, 32, 2h, 2w] -> [B, h*w, 128]; token (y, x) holds channel c*4 + p1*2 + p2, tokens in raster order."""
    batch, channels, height, width = latents.shape
    if height % PATCH or width % PATCH:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}.")
    h, w = height // PATCH, width // PATCH
    x = latents.reshape(batch, channels, h, PATCH, w, PATCH)  # [B, C, h, p1, w, p2]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p1, p2]
    return x.reshape(batch, h * w, channels * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height_tokens: int, width_tokens: int) -> torch.Tensor:
    """[B, h*w, 128] -> [B, 32, 2h, 2w], the inverse of `pack_latents`."""
    batch, length, packed = tokens.shape
    if length != height_tokens * width_tokens or packed % (PATCH * PATCH):
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens into a {height_tokens}x{width_tokens} grid.")
    channels = packed // (PATCH * PATCH)
    x = tokens.reshape(batch, height_tokens, width_tokens, channels, PATCH, PATCH)  # [B, h, w, C, p1, p2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p1, w, p2]
    return x.reshape(batch, channels, height_tokens * PATCH, width_tokens * PATCH)


def _batch_norm_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's `bn` running mean and std (sqrt(var + eps)), shaped [1, 1, 128] for token layout."""
    eps = vae.config.batch_norm_eps
    mean = vae.bn.running_mean.view(1, 1, -1)
    std = torch.sqrt(vae.bn.running_var.view(1, 1, -1) + eps)
    return mean, std


def normalize_tokens(tokens: torch.Tensor, vae) -> torch.Tensor:
    """Packed VAE latents -> the normalised tokens the denoiser works on. [B, L, 128]"""
    mean, std = _batch_norm_stats(vae)
    return (tokens - mean.to(tokens)) / std.to(tokens)


def denormalize_tokens(tokens: torch.Tensor, vae) -> torch.Tensor:
    """Normalised tokens -> packed VAE latents. [B, L, 128]"""
    mean, std = _batch_norm_stats(vae)
    return tokens * std.to(tokens) + mean.to(tokens)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W] -> normalised packed tokens [B, H/16 * W/16, 128] (training, img2img)."""
    latents = vae.encode(images.to(vae.dtype)).latent_dist.mode()  # [B, 32, H/8, W/8]
    return normalize_tokens(pack_latents(latents), vae)


def decode_tokens(vae, tokens: torch.Tensor, height_tokens: int, width_tokens: int) -> torch.Tensor:
    """Normalised packed tokens -> images in [-1, 1], [B, 3, 16h, 16w] (clamped)."""
    # The official order: reshape to [B, 128, h, w], de-normalise, unpack. De-normalising per token first is the
    # same arithmetic, channel by channel.
    latents = unpack_latents(denormalize_tokens(tokens.to(vae.dtype), vae), height_tokens, width_tokens)
    return vae.decode(latents).sample.clamp(-1, 1)
