"""The benchmark's CPU table on the tiny model: every mode reports a row (measured, or skipped with the reason)."""

from __future__ import annotations

import json

import pytest

from lens_core.bench import main
from lens_core.memory import MEMORY_MODES


def test_bench_tiny_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench.md"
    assert (
        main(
            [
                "--size",
                "tiny",
                "--device",
                "cpu",
                "--variants",
                "Lens-Turbo",
                "--resolutions",
                "32",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = out.read_text()
    assert table.startswith("Device: CPU") and table == capsys.readouterr().out.strip() + "\n"
    rows = {row["mode"]: row for row in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == set(MEMORY_MODES)
    for name, mode in MEMORY_MODES.items():
        row = rows[name]
        if mode.needs_cuda:
            assert row["status"].startswith("skipped:") and "needs a CUDA GPU" in row["status"]
            continue
        assert row["status"] == "ok", row
        assert row["image_s"] > 0 and row["step_s"] > 0 and row["encode_s"] > 0
        assert isinstance(row["peak_ram_gb"], float) and row["peak_gpu_gb"] is None  # sampled; no GPU here
        assert row["cosine_to_full"] >= 0.98
        assert row["cfg_slowdown"] > 0  # Lens-Turbo: timed once more with the unconditional pass


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--modes got \\['huge'\\]"):
        main(["--size", "tiny", "--modes", "huge"])
    with pytest.raises(ValueError, match="multiples of 16"):
        main(["--size", "tiny", "--resolutions", "30"])


def test_random_components_builder_runs_a_quantized_mode():
    """The real-size builder's code path at toy size: loader-like dtypes, MXFP4 bytes, and a pipeline that runs."""
    import torch

    from lens_core.bench import build_random_components
    from lens_core.memory import apply_memory_mode
    from lens_core.memory_sim import CHECK_ENCODER_CONFIG
    from lens_core.pipeline_lens import LensPipeline
    from lens_core.tiny import TINY_TRANSFORMER_CONFIG

    # The real layer types at toy widths (the simulator's check configuration), with layer 5 so features exist.
    encoder_config = {**CHECK_ENCODER_CONFIG, "num_hidden_layers": 5, "sliding_window": 32}
    vae_config = {"block_out_channels": (16, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
    components = build_random_components(encoder_config, TINY_TRANSFORMER_CONFIG, vae_config, dtype=torch.float32)
    experts = components["text_encoder"].model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and experts.gate_up_proj_bias.dtype == torch.float32
    assert components["text_encoder"].model.layers[0].input_layernorm.weight.dtype == torch.float32
    pipe = apply_memory_mode(LensPipeline(**components), "minimal", "cpu")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a fox", height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
