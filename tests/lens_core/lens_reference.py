"""An independent, deliberately plain re-implementation of the Lens math straight from LENS_SPEC, for tests.

It shares no code with lens_core: explicit softmax attention, complex-number RoPE, a hand-written timestep
embedding and sampler. Tests compare lens_core against it on the tiny random weights in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def timestep_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None] * 1000.0
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [cos | sin]


def rope_complex(positions, axes_dims, theta=10000.0):
    """positions [S, 3] -> complex rotations [S, head_dim/2]."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        k = torch.arange(dim // 2, dtype=torch.float64)
        omega = 1.0 / theta ** (2 * k / dim)
        parts.append(positions[:, axis].double()[:, None] * omega[None])
    angles = torch.cat(parts, dim=-1)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x, rotations):
    """x [B, S, H, D] real -> rotated, adjacent pairs as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rotations[None, :, None, :]).flatten(-2).to(x.dtype)


def positions(h, w, s_txt):
    img = []
    for y in range(h):
        for x in range(w):
            img.append([0, y - (h - h // 2), x - (w - w // 2)])
    start = max(h // 2, w // 2)
    txt = [[start + j] * 3 for j in range(s_txt)]
    return torch.tensor(img), torch.tensor(txt)


def denoiser_forward(sd, config, img_tokens, text_layers, text_mask, timestep, h, w):
    """The Lens denoiser from a raw state dict `sd` (official names) and config dict."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    B, S_img, _ = img_tokens.shape
    S_txt = text_layers[0].shape[1]

    def linear(x, name, bias=True):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias") if bias else None)

    img = linear(img_tokens, "img_in")
    t = timestep_embedding(timestep)
    temb = linear(
        F.silu(linear(t, "time_text_embed.timestep_embedder.linear_1")), "time_text_embed.timestep_embedder.linear_2"
    )
    normed = [rms_norm(layer, sd[f"txt_norm.{i}.weight"], 1e-5) for i, layer in enumerate(text_layers)]
    txt = linear(torch.cat(normed, -1), "txt_in")

    img_pos, txt_pos = positions(h, w, S_txt)
    img_rot = rope_complex(img_pos, config["axes_dims_rope"])
    txt_rot = rope_complex(txt_pos, config["axes_dims_rope"])
    key_valid = torch.cat([torch.ones(B, S_img, dtype=torch.bool), text_mask.bool()], 1)  # [B, S]

    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}."
        mods = {}
        for stream in ("img", "txt"):
            m = linear(F.silu(temb), p + f"{stream}_mod.1")[:, None]
            mods[stream] = m.chunk(6, -1)
        streams = {"img": img, "txt": txt}
        qkv = {}
        for stream, (qn, kn), rot in (
            ("img", ("norm_q", "norm_k"), img_rot),
            ("txt", ("norm_added_q", "norm_added_k"), txt_rot),
        ):
            shift1, scale1 = mods[stream][0], mods[stream][1]
            x = rms_norm(streams[stream], sd[p + f"{stream}_norm1.weight"], 1e-6) * (1 + scale1) + shift1
            q, k, v = linear(x, p + f"attn.{stream}_qkv").view(B, -1, 3, heads, head_dim).unbind(2)
            q = apply_rope(rms_norm(q, sd[p + f"attn.{qn}.weight"], 1e-6), rot)
            k = apply_rope(rms_norm(k, sd[p + f"attn.{kn}.weight"], 1e-6), rot)
            qkv[stream] = (q, k, v)
        q = torch.cat([qkv["img"][0], qkv["txt"][0]], 1).transpose(1, 2)  # [B, H, S, D]
        k = torch.cat([qkv["img"][1], qkv["txt"][1]], 1).transpose(1, 2)
        v = torch.cat([qkv["img"][2], qkv["txt"][2]], 1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, heads * head_dim)
        outs = {
            "img": linear(attn[:, :S_img], p + "attn.to_out.0"),
            "txt": linear(attn[:, S_img:], p + "attn.to_add_out"),
        }
        for stream in ("img", "txt"):
            shift1, scale1, gate1, shift2, scale2, gate2 = mods[stream]
            x = streams[stream] + gate1 * outs[stream]
            y = rms_norm(x, sd[p + f"{stream}_norm2.weight"], 1e-6) * (1 + scale2) + shift2
            mlp = F.linear(
                F.silu(F.linear(y, sd[p + f"{stream}_mlp.w1.weight"])) * F.linear(y, sd[p + f"{stream}_mlp.w3.weight"]),
                sd[p + f"{stream}_mlp.w2.weight"],
            )
            streams[stream] = x + gate2 * mlp
        img, txt = streams["img"], streams["txt"]

    scale, shift = linear(F.silu(temb), "norm_out.linear")[:, None].chunk(2, -1)
    out = F.layer_norm(img, (img.shape[-1],), eps=1e-6) * (1 + scale) + shift
    return linear(out, "proj_out")


def mu(L, N):
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if L > 4300:
        return a2 * L + b2
    m200, m10 = a2 * L + b2, a1 * L + b1
    return m200 + (m200 - m10) / 190 * (N - 200)


def sigmas(N, L):
    s = torch.linspace(1, 1 / N, N, dtype=torch.float32).double()
    m = mu(L, N)
    shifted = math.exp(m) / (math.exp(m) + (1 / s - 1))
    return torch.cat([shifted.float(), torch.zeros(1)])


def sample(velocity_fn, noise, N, guidance, cond, uncond):
    """Euler sampler with guidance and per-token norm rescale, as the official pipeline runs it: both passes and the
    combination at every guidance scale (also at 1 and below). velocity_fn(x, t, text_layers, mask) -> v."""
    L = noise.shape[1]
    sig = sigmas(N, L)
    x = noise.clone()
    for i in range(N):
        t = (sig[i] * 1000).float() / 1000
        t_batch = t.expand(x.shape[0])
        v_cond = velocity_fn(x, t_batch, *cond)
        v_uncond = velocity_fn(x, t_batch, *uncond)
        comb = v_uncond + guidance * (v_cond - v_uncond)
        n_cond = v_cond.norm(dim=-1, keepdim=True)
        n_comb = comb.norm(dim=-1, keepdim=True)
        v = comb * torch.where(n_comb == 0, torch.ones_like(n_comb), n_cond / n_comb.clamp_min(1e-12))
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def negative_branch(positive_layers, positive_mask, negative_prompts, encode):
    """The official negative: when every negative is empty after stripping whitespace, all-zero features of the
    positive's shape with an all-False mask; otherwise the encoded negatives."""
    if all(not text.strip() for text in negative_prompts):
        return [torch.zeros_like(t) for t in positive_layers], torch.zeros_like(positive_mask)
    return encode(negative_prompts)


def decode(vae, latents, h, w):
    """Packed tokens -> image in 0..1: [B, C*p*p, h, w], de-normalise with the VAE's bn, unpack, decode, clamp."""
    p = vae.config.patch_size[0]
    channels = vae.config.latent_channels
    batch = latents.shape[0]
    bn = vae.bn
    x = latents.reshape(batch, h, w, channels * p * p).permute(0, 3, 1, 2)  # [B, C*p*p, h, w]
    x = x * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps) + bn.running_mean.view(1, -1, 1, 1)
    x = x.reshape(batch, channels, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(batch, channels, p * h, p * w)
    return (vae.decode(x).sample.clamp(-1, 1) + 1) / 2
