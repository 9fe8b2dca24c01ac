"""Moving latents between the FLUX.2 VAE and the denoiser's token layout (LENS_SPEC sections 2.2 and 4).

Every shape comes from the components' configs (`LatentLayout.from_vae`): the real model has 32 VAE channels, 2x2
patches, 128 packed channels and 16 pixels per token, but a checkpoint in the same layout with, say, a 4-channel VAE
works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentLayout:
    """How VAE latents map to denoiser tokens: `patch_size` x `patch_size` cells of `latent_channels` per token."""

    latent_channels: int  # VAE latent channels (32 for FLUX.2)
    patch_size: int  # latent cells per token side (2)
    vae_scale_factor: int  # pixels per latent cell side (8: the VAE downsamples three times)

    @classmethod
    def from_vae(cls, vae) -> LatentLayout:
        """Read the layout from an `AutoencoderKLFlux2` config (`latent_channels`, `patch_size`, `block_out_channels`)."""
        config = vae.config
        patch = config.patch_size
        patch = (int(patch), int(patch)) if isinstance(patch, int) else tuple(int(p) for p in patch)
        if len(patch) != 2 or patch[0] != patch[1] or patch[0] < 1:
            raise ValueError(f"Lens packs square latent patches; the VAE config has patch_size {config.patch_size!r}.")
        return cls(int(config.latent_channels), patch[0], 2 ** (len(config.block_out_channels) - 1))

    @property
    def packed_channels(self) -> int:
        """Channels of one token: latent_channels x patch x patch (128 for the real model)."""
        return self.latent_channels * self.patch_size**2

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per token side: VAE downsampling x patch (16 for the real model)."""
        return self.vae_scale_factor * self.patch_size

    def check_transformer(self, transformer_config) -> None:
        """Raise a ValueError when the denoiser's config does not fit this VAE layout (its tokens would not match)."""
        in_channels, out_channels = int(transformer_config.in_channels), int(transformer_config.out_channels)
        patch = int(transformer_config.patch_size)
        if in_channels != self.packed_channels or out_channels * patch**2 != in_channels or patch != self.patch_size:
            raise ValueError(
                f"The denoiser (in_channels={in_channels}, out_channels={out_channels}, patch_size={patch}) does not "
                f"fit the VAE ({self.latent_channels} latent channels in {self.patch_size}x{self.patch_size} patches = "
                f"{self.packed_channels} packed channels): in_channels must equal out_channels x patch_size^2 = the "
                "packed channels, and the patch sizes must agree."
            )


def _patch(patch_size: int | tuple[int, int]) -> tuple[int, int]:
    return (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))


def pack_latents(latents: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """[B, C, p*h, p*w] -> [B, h*w, C*p*p]; token (y, x) holds channel c*p*p + p1*p + p2, tokens in raster order."""
    batch, channels, height, width = latents.shape
    p1, p2 = _patch(patch_size)
    if height % p1 or width % p2:
        raise ValueError(f"latent height and width must be multiples of the patch {p1}x{p2}, got {height}x{width}.")
    h, w = height // p1, width // p2
    x = latents.reshape(batch, channels, h, p1, w, p2)  # [B, C, h, p1, w, p2]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p1, p2]
    return x.reshape(batch, h * w, channels * p1 * p2)


def unpack_latents(
    tokens: torch.Tensor, height_tokens: int, width_tokens: int, patch_size: int | tuple[int, int]
) -> torch.Tensor:
    """[B, h*w, C*p*p] -> [B, C, p*h, p*w], the inverse of `pack_latents`."""
    batch, length, packed = tokens.shape
    p1, p2 = _patch(patch_size)
    if length != height_tokens * width_tokens or packed % (p1 * p2):
        raise ValueError(
            f"cannot unpack {tuple(tokens.shape)} tokens into a {height_tokens}x{width_tokens} grid of {p1}x{p2} patches."
        )
    channels = packed // (p1 * p2)
    x = tokens.reshape(batch, height_tokens, width_tokens, channels, p1, p2)  # [B, h, w, C, p1, p2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p1, w, p2]
    return x.reshape(batch, channels, height_tokens * p1, width_tokens * p2)


def _batch_norm_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's `bn` running mean and std (sqrt(var + eps)), shaped [1, 1, packed] for token layout."""
    eps = vae.config.batch_norm_eps
    mean = vae.bn.running_mean.view(1, 1, -1)
    std = torch.sqrt(vae.bn.running_var.view(1, 1, -1) + eps)
    return mean, std


def normalize_tokens(tokens: torch.Tensor, vae) -> torch.Tensor:
    """Packed VAE latents -> the normalised tokens the denoiser works on. [B, L, packed]"""
    mean, std = _batch_norm_stats(vae)
    return (tokens - mean.to(tokens)) / std.to(tokens)


def denormalize_tokens(tokens: torch.Tensor, vae) -> torch.Tensor:
    """Normalised tokens -> packed VAE latents. [B, L, packed]"""
    mean, std = _batch_norm_stats(vae)
    return tokens * std.to(tokens) + mean.to(tokens)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W] -> normalised packed tokens [B, H/16 * W/16, packed] (training, img2img)."""
    layout = LatentLayout.from_vae(vae)
    latents = vae.encode(images.to(vae.dtype)).latent_dist.mode()  # [B, C, H/8, W/8]
    return normalize_tokens(pack_latents(latents, layout.patch_size), vae)


def decode_tokens(vae, tokens: torch.Tensor, height_tokens: int, width_tokens: int) -> torch.Tensor:
    """Normalised packed tokens -> images in [-1, 1], [B, 3, 16h, 16w] (clamped)."""
    layout = LatentLayout.from_vae(vae)
    # The official order: reshape to [B, packed, h, w], de-normalise, unpack. De-normalising per token first is the
    # same arithmetic, channel by channel.
    tokens = denormalize_tokens(tokens.to(vae.dtype), vae)  # [B, h*w, packed]
    latents = unpack_latents(tokens, height_tokens, width_tokens, layout.patch_size)  # [B, C, 2h, 2w]
    return vae.decode(latents).sample.clamp(-1, 1)
