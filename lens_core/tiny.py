"""A tiny random Lens in the exact official folder layout, for tests and offline demos.

    python -m lens_core.tiny OUT_DIR [--seed 0] [--latent-channels 32] [--patch-size 2]

Every component is its real class at toy size: a 6-layer GPT-OSS with MXFP4 experts (random bytes, as the real format
stores them), a byte-level BPE tokenizer with the harmony control tokens, a 2-block `LensTransformer2DModel` saved as
float32 shards with an index, a FLUX.2 VAE whose downsampling is still 8, and the official scheduler config.
`--latent-channels` / `--patch-size` build a model with other channel counts (e.g. a 4-channel VAE): the transformer's
`in_channels` / `out_channels` follow, as every shape in lens_core is read from the configs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .prompt import SUFFIX, render_prefix
from .safetensors_io import save_sharded
from .text_encoder import GPT_OSS_ROPE_PARAMETERS, MXFP4_QUANTIZATION_CONFIG

logger = logging.getLogger(__name__)

# The GPT-OSS (harmony) special tokens, in the order of their real ids.
HARMONY_SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
)
MODEL_INDEX = {
    "_class_name": "LensPipeline",
    "_diffusers_version": "0.37.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LensGptOssEncoder"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "LensTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
TINY_ENCODER_LAYERS = 6
TINY_SELECTED_LAYERS = [0, 2, 3, 4]  # layer 5 exists in the checkpoint but is never needed (skipped at load)
TINY_ENCODER_HIDDEN = 64
TINY_TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "in_channels": 128,
    "out_channels": 32,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "inner_dim": 32,
    "enc_hidden_dim": TINY_ENCODER_HIDDEN,
    "axes_dims_rope": [4, 6, 6],
    "gate_mlp": True,
    "rms_norm": True,
    "multi_layer_encoder_feature": True,
    "selected_layer_index": TINY_SELECTED_LAYERS,
}
TOKENIZER_CORPUS = (
    "A red fox sitting in tall green grass at sunset, warm light, detailed fur texture.",
    "A close-up photo of a ceramic mug with steam rising, on a wooden table near a window.",
    "An isometric illustration of a tiny city with blue rooftops, trees and a river.",
    "Two cats, one black and one white, sleeping on a striped blanket.",
    "A neon sign that reads OPEN in pink letters on a dark brick wall.",
)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}"
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {{ strftime_now('%Y-%m-%d') }}\n\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>developer<|message|># Instructions\n\n{{ message.content }}\n\n<|end|>"
    "{%- elif message.role == 'user' -%}<|start|>user<|message|>{{ message.content }}<|end|>"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if message.thinking -%}<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>{%- endif -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|return|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def build_tiny_tokenizer(folder: Path):
    """A byte-level BPE (any text encodes) with the harmony control tokens as special tokens; pads with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=list(HARMONY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [render_prefix(), SUFFIX, *TOKENIZER_CORPUS] * 4
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    return fast


def _save_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    """Save a state dict as about `num_shards` safetensors shards plus an index, as the official checkpoints are."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    entries = [(name, t.numel() * t.element_size(), lambda t=t: t) for name, t in state.items()]
    save_sharded(folder, entries, "model.safetensors", max_shard_bytes=total // num_shards + 1)


def build_tiny_text_encoder(folder: Path, vocab_size: int, pad_token_id: int, generator: torch.Generator) -> None:
    """A tiny GPT-OSS stored like the official `text_encoder/`: bf16 weights, MXFP4 expert bytes, float32 expert biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        num_hidden_layers=TINY_ENCODER_LAYERS,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=vocab_size,
        hidden_size=TINY_ENCODER_HIDDEN,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=32,  # shorter than the tiny preamble, so the sliding layers really slide
        max_position_embeddings=131072,
        rope_parameters=dict(GPT_OSS_ROPE_PARAMETERS),
        pad_token_id=pad_token_id,
        eos_token_id=pad_token_id,
    )
    model = GptOssForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        if name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).float()
        else:
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.08).to(torch.bfloat16)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            state[name] = (1 + 0.1 * torch.randn(tensor.shape, generator=generator)).to(torch.bfloat16)
    experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        # Random FP4 codes and scales near 2^-4: values up to 6/16, like a trained layer's range.
        state[prefix + "gate_up_proj_blocks"] = torch.randint(
            0, 256, (experts, 2 * inter, hidden // 32, 16), generator=generator, dtype=torch.uint8
        )
        state[prefix + "gate_up_proj_scales"] = torch.randint(
            121, 125, (experts, 2 * inter, hidden // 32), generator=generator, dtype=torch.uint8
        )
        state[prefix + "down_proj_blocks"] = torch.randint(
            0, 256, (experts, hidden, inter // 32, 16), generator=generator, dtype=torch.uint8
        )
        state[prefix + "down_proj_scales"] = torch.randint(
            121, 125, (experts, hidden, inter // 32), generator=generator, dtype=torch.uint8
        )
    folder.mkdir(parents=True, exist_ok=True)
    _save_shards(dict(sorted(state.items())), folder, num_shards=3)
    config_dict = config.to_dict()
    config_dict["architectures"] = ["GptOssForCausalLM"]
    config_dict["quantization_config"] = dict(MXFP4_QUANTIZATION_CONFIG)
    # Which layers give the features (the real model's default, 5/11/17/23, does not exist in 6 layers): lets the
    # encoder load on its own, e.g. through diffusers' DiffusionPipeline.from_pretrained.
    config_dict["lens_selected_layers"] = list(TINY_SELECTED_LAYERS)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": pad_token_id, "pad_token_id": pad_token_id})
    )


def build_tiny_vae(folder: Path, generator: torch.Generator, latent_channels: int = 32, patch_size: int = 2) -> None:
    """A FLUX.2 VAE with 4 blocks (downsampling 8) of 16 channels and random batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        patch_size=(patch_size, patch_size),
        sample_size=64,
    )
    vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    vae.save_pretrained(str(folder))


def tiny_transformer_config(latent_channels: int = 32, patch_size: int = 2) -> dict:
    """TINY_TRANSFORMER_CONFIG for a VAE with `latent_channels` channels packed in `patch_size` patches."""
    packed = latent_channels * patch_size**2
    return {**TINY_TRANSFORMER_CONFIG, "in_channels": packed, "out_channels": latent_channels, "patch_size": patch_size}


def build_tiny_transformer(folder: Path, latent_channels: int = 32, patch_size: int = 2) -> None:
    """A 2-block, 2-head Lens denoiser, float32, saved in two shards with an index like the official one."""
    from .transformer_lens import LensTransformer2DModel

    model = LensTransformer2DModel(**tiny_transformer_config(latent_channels, patch_size))
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(str(folder), max_shard_size=total_bytes // 2 + 1024)  # two shards + index, like the official


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, latent_channels: int = 32, patch_size: int = 2) -> Path:
    """Write a random tiny Lens in the official diffusers layout to `out_dir` and return its path. `latent_channels`
    and `patch_size` set the VAE's latent layout (the denoiser's channels follow; the real model: 32 and 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer(out / "tokenizer")
        build_tiny_text_encoder(out / "text_encoder", len(tokenizer), tokenizer.pad_token_id, generator)
        build_tiny_transformer(out / "transformer", latent_channels, patch_size)
        build_tiny_vae(out / "vae", generator, latent_channels, patch_size)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(str(out / "scheduler"))
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return out


TINY_FORMAT_VERSION = 2  # bump when the tiny layout changes, so cached copies are rebuilt


def ensure_tiny_checkpoint(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The tiny checkpoint in a cache folder (built once, atomically: a temp folder renamed into place)."""
    import os
    import shutil
    import tempfile

    root = Path(cache_dir or os.environ.get("LENS_CACHE_DIR") or Path.home() / ".cache" / "lens-studio")
    target = root / f"tiny-v{TINY_FORMAT_VERSION}-seed{seed}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        build_tiny_checkpoint(staging, seed=seed)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race with another process: fine if it won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lens_core.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    parser.add_argument("--latent-channels", type=int, default=32, help="VAE latent channels (the real model: 32)")
    parser.add_argument("--patch-size", type=int, default=2, help="latent cells per token side (the real model: 2)")
    args = parser.parse_args(argv)
    if args.latent_channels < 1 or args.patch_size < 1:
        parser.error(f"--latent-channels and --patch-size must be >= 1, got {args.latent_channels}, {args.patch_size}.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_tiny_checkpoint(args.out_dir, args.seed, args.latent_channels, args.patch_size)
    logger.info("Tiny Lens checkpoint written to %s", path)


if __name__ == "__main__":
    main()
