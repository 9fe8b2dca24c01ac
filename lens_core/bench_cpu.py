"""CPU micro-benchmark of the Lens core: `python -m lens_core.bench_cpu` (also `python -m lens_core.bench micro`).

Times the pieces later changes are compared on, with random weights (speed does not depend on the values), on CPU:
- RoPE: the complex-multiply rotation against the real-valued pairs it replaced and the `torch.compile` formulation;
- MXFP4 dequantization of one real-size expert: ours, the two-lookup + ldexp version it replaced, transformers';
- text encoding (a reduced-width GPT-OSS with MXFP4 experts): ours per call (the streaming modes), ours in `full`
  (dense experts resident), transformers' experts dequantized per call, and transformers' dense experts
  (dequantized once at load, the official path);
- the denoiser forward (batch 1 and 2) and the whole pipeline in `full` (Turbo at guidance 1, Lens at guidance 5),
  with the prompt encoded and with its features cached.

Figures go to BENCHMARKS.md with the machine they were taken on; tests never assert on them.

    python -m lens_core.bench_cpu --out bench-cpu.md            # the "small" model, float32 and bf16
    python -m lens_core.bench_cpu --size tiny --repeats 1       # seconds: the code path CI runs
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .atomic_io import atomic_write_text
from .text_encoder import FP4_VALUES, GPT_OSS_ROPE_PARAMETERS, MXFP4_BLOCK, LensGptOssExperts, dequantize_mxfp4
from .transformer_lens import apply_rope, rope_tables

logger = logging.getLogger(__name__)

BENCH_PROMPT = "A red fox sitting in tall green grass at sunset, warm light, detailed fur texture."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Model sizes: "small" is wide enough that matmuls, not Python, dominate; "tiny" is the test checkpoint's size.
SIZES = {
    "small": {
        "encoder": {
            "num_hidden_layers": 6,
            "hidden_size": 1024,
            "intermediate_size": 1024,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "head_dim": 64,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "sliding_window": 128,
        },
        "selected_layers": [1, 3, 4, 5],
        "transformer": {
            "num_layers": 4,
            "attention_head_dim": 64,
            "num_attention_heads": 8,
            "inner_dim": 512,
            "axes_dims_rope": [8, 28, 28],
        },
        "image_size": 256,
        "rope": {"tokens": 4096 + 128, "heads": 24, "head_dim": 64},  # the real model at 1024x1024
    },
    "tiny": {
        "encoder": {
            "num_hidden_layers": 5,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "sliding_window": 32,
        },
        "selected_layers": [0, 2, 3, 4],
        "transformer": {
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "inner_dim": 32,
            "axes_dims_rope": [4, 6, 6],
        },
        "image_size": 32,
        "rope": {"tokens": 64, "heads": 2, "head_dim": 16},
    },
}
TINY_VAE = {"block_out_channels": (16, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
REAL_EXPERT = {"hidden": 2880, "intermediate": 2880}


@dataclass
class Timing:
    """One measured row: `what` in `dtype`, the best of the repeats in milliseconds, and a note."""

    section: str
    what: str
    dtype: str
    best_ms: float
    note: str = ""


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Run once to warm up, then `repeats` times; the fastest run in milliseconds."""
    return best_ms_each({"": fn}, repeats)[""]


def best_ms_each(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Warm each up, then run them in turn `repeats` times (so a busy machine slows all of them alike); the fastest
    run of each in milliseconds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) * 1e3 for name, values in times.items()}


# ----------------------------------------------------------------------------------------------------------------
# The formulations that were replaced, kept here only to be measured against
# ----------------------------------------------------------------------------------------------------------------


def rope_real_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The previous rotation: unbind the pairs, rotate with half-size cos/sin, stack back. cos, sin: [S, D/2]."""
    real, imag = x.to(torch.float32).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).to(x.dtype)


def dequantize_two_lookups(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The previous dequantization: a lookup per nibble, then ldexp by the scale exponent."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(-1, -2).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


def bench_rope(size: dict, dtype_name: str, repeats: int) -> list[Timing]:
    shape = size["rope"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, shape["tokens"], shape["heads"], shape["head_dim"], generator=generator).to(DTYPES[dtype_name])
    angles = torch.rand(shape["tokens"], shape["head_dim"] // 2, generator=generator) * 30
    tables = rope_tables(angles)
    cos, sin = angles.cos(), angles.sin()
    real = rope_tables(angles)

    def compiled_formula():  # what apply_rope runs under torch.compile, here in eager
        x32 = x.float()
        swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return (x32 * real.cos[None, :, None] + swapped * real.sin[None, :, None]).to(x.dtype)

    note = f"[1, {shape['tokens']}, {shape['heads']}, {shape['head_dim']}]"
    fns = {
        "real-valued pairs (before)": lambda: rope_real_pairs(x, cos, sin),
        "complex multiply (now, eager)": lambda: apply_rope(x, tables),
        "cos/sin + swapped pairs (torch.compile path, run eagerly)": compiled_formula,
    }
    return [Timing("RoPE", what, dtype_name, ms, note) for what, ms in best_ms_each(fns, repeats).items()]


def bench_dequantize(dtype_name: str, repeats: int) -> list[Timing]:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    hidden, inter = REAL_EXPERT["hidden"], REAL_EXPERT["intermediate"]
    blocks = torch.randint(0, 256, (2 * inter, hidden // MXFP4_BLOCK, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(118, 125, (2 * inter, hidden // MXFP4_BLOCK), generator=generator, dtype=torch.uint8)
    note = f"one real gate_up expert ({2 * inter}x{hidden})"
    fns = {
        "two nibble lookups + ldexp (before)": lambda: dequantize_two_lookups(blocks, scales, dtype),
        "byte table + scale table (now)": lambda: dequantize_mxfp4(blocks, scales, dtype),
        "transformers convert_moe_packed_tensors": lambda: convert_moe_packed_tensors(
            blocks[None], scales[None], dtype=dtype
        ),
    }
    return [Timing("MXFP4 dequantize", what, dtype_name, ms, note) for what, ms in best_ms_each(fns, repeats).items()]


class _TransformersExpertsPerCall(LensGptOssExperts):
    """Baseline: each call dequantizes the whole layer with transformers' `convert_moe_packed_tensors`."""

    def forward(self, hidden_states, router_indices, routing_weights):
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        dtype = hidden_states.dtype
        gate_up = convert_moe_packed_tensors(self.gate_up_proj_blocks, self.gate_up_proj_scales, dtype=dtype)
        down = convert_moe_packed_tensors(self.down_proj_blocks, self.down_proj_scales, dtype=dtype)
        return _transformers_experts(self, gate_up, down)(hidden_states, router_indices, routing_weights)


def _transformers_experts(
    experts: LensGptOssExperts, gate_up: torch.Tensor, down: torch.Tensor, implementation: str = "eager"
):
    """transformers' `GptOssExperts` holding the given dense weights ([E, H, 2I], [E, I, H]) and our biases, run by
    transformers' experts `implementation` ("eager": a loop over the hit experts; "grouped_mm", "batched_mm")."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = SimpleNamespace(
        intermediate_size=down.shape[1],
        num_local_experts=gate_up.shape[0],
        hidden_size=gate_up.shape[1],
        swiglu_alpha=experts.alpha,
        swiglu_limit=experts.limit,
        _experts_implementation=implementation,
    )
    with torch.device("meta"):
        module = GptOssExperts(config)
    module.load_state_dict(
        {
            "gate_up_proj": gate_up,
            "down_proj": down,
            "gate_up_proj_bias": experts.gate_up_proj_bias,
            "down_proj_bias": experts.down_proj_bias,
        },
        assign=True,
    )
    return module


def _encoder_variants(encoder) -> dict[str, torch.nn.Module]:
    """The same weights several ways: ours per call, ours with dense experts (full), transformers per call / dense."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    encoder = copy.deepcopy(encoder)
    encoder.release_dequantized_experts()
    full = copy.deepcopy(encoder)
    full.keep_dequantized_experts()
    per_call, dense, grouped = copy.deepcopy(encoder), copy.deepcopy(encoder), copy.deepcopy(encoder)
    for layer_per_call, layer_dense, layer_grouped in zip(
        per_call.model.layers, dense.model.layers, grouped.model.layers
    ):
        own = layer_per_call.mlp.experts
        with torch.device("meta"):
            baseline = _TransformersExpertsPerCall(encoder.config, mxfp4=True)
        baseline.load_state_dict(own.state_dict(), assign=True)
        layer_per_call.mlp.experts = baseline
        gate_up = convert_moe_packed_tensors(own.gate_up_proj_blocks, own.gate_up_proj_scales, dtype=encoder.dtype)
        down = convert_moe_packed_tensors(own.down_proj_blocks, own.down_proj_scales, dtype=encoder.dtype)
        layer_dense.mlp.experts = _transformers_experts(own, gate_up, down)
        layer_grouped.mlp.experts = _transformers_experts(own, gate_up, down, "grouped_mm")
    return {
        "ours, MXFP4 dequantized per expert per call (balanced/low/minimal)": encoder,
        "ours, dense experts resident (full/fast)": full,
        "transformers, convert_moe_packed_tensors per call": per_call,
        "transformers, dense experts dequantized at load (official path)": dense,
        "transformers, dense experts, grouped_mm": grouped,
    }


def bench_text_encoding(pipe, dtype_name: str, repeats: int) -> list[Timing]:
    tokens = pipe.tokenize([BENCH_PROMPT])
    note = f"{tokens.input_ids.shape[1]} tokens, {len(pipe.text_encoder.model.layers)} layers"
    fns = {
        what: (lambda encoder=encoder: encoder(tokens.input_ids, attention_mask=tokens.attention_mask))
        for what, encoder in _encoder_variants(pipe.text_encoder).items()
    }
    with torch.no_grad():
        timings = best_ms_each(fns, repeats)
    return [Timing("text encoding", what, dtype_name, ms, note) for what, ms in timings.items()]


def bench_denoiser(pipe, dtype_name: str, repeats: int, image_size: int) -> list[Timing]:
    transformer = pipe.transformer
    grid = image_size // pipe.pixels_per_token
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for batch in (1, 2):
            tokens = torch.randn(batch, grid * grid, transformer.config.in_channels, generator=generator)
            text = [
                torch.randn(batch, 120, transformer.config.enc_hidden_dim, generator=generator)
                for _ in pipe.selected_layers
            ]
            mask = torch.ones(batch, 120, dtype=torch.bool)
            mask[1:, 100:] = False  # the guidance batch: the second row has padding, like a shorter negative

            def forward(tokens=tokens, text=text, mask=mask):
                dtype = pipe.transformer_dtype
                return transformer(
                    tokens.to(dtype),
                    [t.to(dtype) for t in text],
                    mask,
                    torch.full((tokens.shape[0],), 0.5),
                    (1, grid, grid),
                )

            note = f"{image_size}x{image_size} ({grid * grid} image + 120 text tokens)"
            rows.append(Timing("denoiser forward", f"batch {batch}", dtype_name, best_ms(forward, repeats), note))
    return rows


def bench_pipeline(pipe, dtype_name: str, repeats: int, image_size: int) -> list[Timing]:
    """Whole images in memory mode `full`, with the prompt encoded each time and with its features cached."""
    from .text_cache import TextFeatureCache

    cache = TextFeatureCache()

    def run(steps: int, guidance: float, cached: bool):
        pipe.text_feature_cache = cache if cached else None
        generator = torch.Generator().manual_seed(0)
        size = {"height": image_size, "width": image_size}
        return pipe(
            BENCH_PROMPT, **size, num_inference_steps=steps, guidance_scale=guidance, generator=generator
        ).images

    fns, notes = {}, {}
    for variant, steps, guidance in (("Lens-Turbo", 4, 1.0), ("Lens", 20, 5.0)):
        for cached, label in ((False, "prompt encoded"), (True, "features cached")):
            fns[f"{variant}, {label}"] = lambda steps=steps, guidance=guidance, cached=cached: run(
                steps, guidance, cached
            )
            notes[f"{variant}, {label}"] = f"{steps} steps, guidance {guidance}, {image_size}x{image_size}"
    timings = best_ms_each(fns, repeats)
    pipe.text_feature_cache = None
    return [Timing("whole pipeline", what, dtype_name, ms, notes[what]) for what, ms in timings.items()]


# ----------------------------------------------------------------------------------------------------------------
# Building, running, reporting
# ----------------------------------------------------------------------------------------------------------------


def build_pipeline(size_name: str, dtype: torch.dtype):
    """A `LensPipeline` of the given size with random weights (MXFP4 experts), on CPU in memory mode `full`."""
    from .bench import build_random_components
    from .memory import apply_memory_mode
    from .pipeline_lens import LensPipeline

    size = SIZES[size_name]
    transformer = {
        **size["transformer"],
        "selected_layer_index": size["selected_layers"],
        "enc_hidden_dim": size["encoder"]["hidden_size"],
    }
    components = build_random_components(
        {
            **size["encoder"],
            "vocab_size": 640,
            "max_position_embeddings": 131072,
            "rope_parameters": GPT_OSS_ROPE_PARAMETERS,
        },
        transformer,
        TINY_VAE,
        dtype=dtype,
    )
    pipe = apply_memory_mode(LensPipeline(**components), "full", "cpu")  # dense experts resident, as `full` keeps them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(size_name: str, dtype_names: list[str], repeats: int, sections: list[str]) -> list[Timing]:
    size = SIZES[size_name]
    rows: list[Timing] = []
    for dtype_name in dtype_names:
        if "rope" in sections:
            rows += bench_rope(size, dtype_name, repeats)
        if "dequantize" in sections:
            rows += bench_dequantize(dtype_name, repeats)
        if not {"encode", "denoiser", "pipeline"} & set(sections):
            continue
        pipe = build_pipeline(size_name, DTYPES[dtype_name])
        if "encode" in sections:
            rows += bench_text_encoding(pipe, dtype_name, repeats)
        if "denoiser" in sections:
            rows += bench_denoiser(pipe, dtype_name, repeats, size["image_size"])
        if "pipeline" in sections:
            rows += bench_pipeline(pipe, dtype_name, repeats, size["image_size"])
    return rows


def machine_label() -> str:
    """The CPU model, its core count, torch's thread count and version: the context every figure needs."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def format_table(rows: list[Timing], size_name: str) -> str:
    lines = [
        f"Device: CPU, {machine_label()}, {size_name} model",
        "",
        "| section | what | dtype | best ms | shape / setting |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.section} | {r.what} | {r.dtype} | {r.best_ms:.2f} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"


SECTIONS = ("rope", "dequantize", "encode", "denoiser", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lens_core.bench_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="Model size (default small).")
    parser.add_argument("--dtypes", default="fp32,bf16", help="Comma-separated: fp32, bf16 (default both).")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated, of {','.join(SECTIONS)}.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per row after one warm-up; the best counts.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--out", default=None, help="Also write the markdown table here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from .bench import _split  # one parser for comma lists across the benchmark commands

    dtypes = _split(args.dtypes, DTYPES, "dtypes")
    sections = _split(args.sections, SECTIONS, "sections")
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError(f"--repeats and --threads must be >= 1, got {args.repeats} and {args.threads}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.size, dtypes, args.repeats, sections)
    table = format_table(rows, args.size)
    print(table)  # noqa: T201 (the command's output)
    if args.out:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
