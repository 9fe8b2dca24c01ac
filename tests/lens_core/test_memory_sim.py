"""The memory simulator: its tracker, its agreement with real CPU runs, the cached table, and what uses it."""

from __future__ import annotations

import math

import pytest
import torch

from lens_core import memory_sim
from lens_core.memory import MEMORY_MODES, SIZE_ORDER, mode_vram_need_gib, pick_memory_mode
from lens_core.memory_sim import (
    CHECK_TRANSFORMER_CONFIG,
    GIB,
    calibrate_denoiser,
    generation_peak_gib,
    load_memory_table,
    quantized_weight_bytes,
    real_tracking,
    required_card_gib,
    simulate_check_table,
    simulation,
)

# The simulator and a real run execute the same ops; what can differ is only how storages are made and freed.
CALIBRATION_TOLERANCE = 0.01
# Libraries create a few tiny tensors once per process and keep them (336 bytes here): whichever simulation runs
# first in a process counts them. The cached table must equal a fresh simulation up to that.
TABLE_TOLERANCE_GIB = 8 * 1024 / GIB


def test_tracker_counts_each_storage_once_and_frees_it():
    with real_tracking() as tracker:
        first = torch.empty(1000, dtype=torch.float32)
        view = first.view(10, 100)  # same storage: not counted again
        second = torch.empty(500, dtype=torch.bfloat16)
        assert tracker.bytes_on("cpu") == 4000 + 1000
        del first
        assert tracker.bytes_on("cpu") == 5000  # the view keeps the storage alive
        del view, second
        assert tracker.bytes_on("cpu") == 0 and tracker.bytes_on("cpu", peak=True) == 5000
        tracker.reset_peak()
        assert tracker.bytes_on("cpu", peak=True) == 0


def test_fake_tensors_cost_nothing_and_the_gpu_is_the_meta_device():
    with simulation() as tracker:
        weights = torch.empty(2**30, dtype=torch.bfloat16)  # 2 GiB that are never allocated
        on_gpu = weights.to(memory_sim.SIMULATED_GPU)
        assert tracker.bytes_on("cpu") == 2 * GIB and tracker.bytes_on(memory_sim.SIMULATED_GPU) == 2 * GIB
        with pytest.raises(RuntimeError, match="devices"):
            _ = on_gpu + weights  # a placement bug fails as it would on a GPU


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_simulator_matches_a_real_cpu_run(backward):
    """A scaled-down denoiser (2 blocks, width 64) at 128x128: the simulated activation peak equals the real CPU
    run's live bytes (counted by the same tracker) within CALIBRATION_TOLERANCE."""
    result = calibrate_denoiser(CHECK_TRANSFORMER_CONFIG, 128, 128, 40, torch.float32, backward=backward)
    assert result.real_gib > 0
    assert abs(result.difference) <= CALIBRATION_TOLERANCE, result


@pytest.fixture(scope="module")
def fresh_check_table():
    return simulate_check_table()


def _assert_close(cached, fresh, path="table"):
    if isinstance(fresh, dict):
        assert set(cached) == set(fresh), path
        for key in fresh:
            _assert_close(cached[key], fresh[key], f"{path}.{key}")
    elif isinstance(fresh, list):
        assert len(cached) == len(fresh), path
        for index, (a, b) in enumerate(zip(cached, fresh)):
            _assert_close(a, b, f"{path}[{index}]")
    elif isinstance(fresh, float):
        assert math.isclose(cached, fresh, abs_tol=TABLE_TOLERANCE_GIB), f"{path}: cached {cached}, fresh {fresh}"
    else:
        assert cached == fresh, path


def test_cached_table_equals_a_fresh_simulation_at_small_size(fresh_check_table):
    """The shipped table was made by the current simulator: its small check section simulates to the same bytes.
    When this fails, regenerate the table: python -m lens_core.bench --simulate --write-table"""
    _assert_close(load_memory_table()["check"], fresh_check_table)


def test_placements_show_in_the_simulation(fresh_check_table):
    modes = fresh_check_table["modes"]
    full, low, minimal = modes["full"], modes["low"], modes["minimal"]
    # full keeps the encoder on the GPU; low streams it, so only one layer at a time adds to the resident denoiser.
    assert low["resident_gib"] < full["resident_gib"]
    assert low["resident_gib"] < low["cases"][0]["encode_peak_gib"] < full["cases"][0]["encode_peak_gib"]
    assert minimal["resident_gib"] < low["resident_gib"]  # NF4 storage
    assert low["host"]["placed_gib"] > full["host"]["placed_gib"]  # the streamed encoder waits in (pinned) RAM
    for case in low["cases"]:
        assert case["peak_gib"] == max(case["encode_peak_gib"], case["denoise_peak_gib"], case["decode_peak_gib"])


def test_real_size_modes_fit_the_cards_they_are_for():
    """Each mode's simulated 1024x1024 Lens generation (with the CUDA margin) fits the card it names."""
    for name, mode in MEMORY_MODES.items():
        need = required_card_gib(generation_peak_gib(name, 1024, 1024, 5.0))
        assert need <= mode.card_gib, f"{name}: needs {need:.1f} GiB, meant for {mode.card_gib} GiB cards"
    order = [generation_peak_gib(name, 1024, 1024, 5.0) for name in SIZE_ORDER]
    assert order == sorted(order, reverse=True)  # SIZE_ORDER goes from the largest need to the smallest


def test_real_size_table_matches_the_published_rtx_4090_report():
    """LENS_SPEC 9: encoder resident + bf16 denoiser peaks at about 24 GB at 1024x1024 and runs out at 1440x1440 on
    a 24 GB card; an fp8 denoiser brings 1440x1440 to about 23 GB."""
    assert 22.5 <= required_card_gib(generation_peak_gib("full", 1024, 1024, 5.0)) <= 24.5
    assert required_card_gib(generation_peak_gib("full", 1440, 1440, 5.0)) > 24
    assert 21 <= required_card_gib(generation_peak_gib("fast", 1440, 1440, 5.0)) <= 24


def test_lookup_takes_the_next_larger_case_and_extends_beyond_the_largest():
    table = {
        "real": {
            "modes": {
                "low": {
                    "cases": [
                        {"width": 1024, "height": 1024, "guidance_scale": 5.0, "peak_gib": 8.0},
                        {"width": 1440, "height": 1440, "guidance_scale": 5.0, "peak_gib": 9.0},
                        {"width": 1024, "height": 1024, "guidance_scale": 1.0, "peak_gib": 7.0},
                        {"width": 1440, "height": 1440, "guidance_scale": 1.0, "peak_gib": 7.5},
                    ]
                }
            }
        }
    }
    assert generation_peak_gib("low", 512, 512, 5.0, table=table) == 8.0
    assert generation_peak_gib("low", 1024, 1024, 1.0, table=table) == 7.0
    assert generation_peak_gib("low", 1216, 1216, 4.0, table=table) == 9.0
    beyond = generation_peak_gib("low", 2048, 2048, 5.0, table=table)  # 16384 tokens: on the 1024-1440 line
    assert math.isclose(beyond, 9.0 + (16384 - 8100) / (8100 - 4096))
    with pytest.raises(ValueError, match="no mode 'huge'"):
        generation_peak_gib("huge", 1024, 1024, 5.0, table=table)


def test_nf4_and_int8_layouts_match_bitsandbytes():
    """The storage layout the simulator counts is what bitsandbytes really stores (quantized here on the CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(256, 192, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(192, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    state = layer.weight.quant_state
    stored = [layer.weight, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
    assert quantized_weight_bytes("nf4", 256, 192) == sum(t.numel() * t.element_size() for t in stored)
    assert quantized_weight_bytes("int8", 256, 192) == 256 * 192 + 4 * 256  # int8 weights + float32 row scales


def test_auto_and_the_fit_check_use_the_simulated_table():
    need_low = mode_vram_need_gib("low")
    assert need_low == memory_sim.required_free_gib(generation_peak_gib("low", 1024, 1024, 5.0))
    assert pick_memory_mode(need_low + 0.01, 64) == "low"
    assert pick_memory_mode(need_low - 0.01, 64) == "minimal"
    assert pick_memory_mode(80, 64) == "full"
    with pytest.raises(ValueError, match="No memory mode fits .* GiB of usable GPU memory"):
        pick_memory_mode(0.5, 64)
    # A larger image needs more: the same card may take a smaller mode at 1440x1440.
    assert mode_vram_need_gib("full", 1440, 1440) > mode_vram_need_gib("full", 1024, 1024)


def test_oom_advice_names_the_largest_smaller_mode_that_fits_this_image():
    from lens_core.memory import oom_advice

    usable = mode_vram_need_gib("low", 1440, 1440) + 0.05
    advice = oom_advice("full", 1440, 1440, 5.0, usable)
    assert "'low'" in advice and "1440x1440" in advice and "simulated" in advice
    assert "No smaller memory mode fits" in oom_advice("sequential", 1440, 1440, 5.0, usable)
    assert "'balanced'" in oom_advice("full", None, None, None, None)  # size unknown: the next smaller mode


def test_readme_mode_table_is_the_generated_one():
    """README's memory-mode table states each card size next to the simulated peak, as generated from the table."""
    from pathlib import Path

    from lens_core.memory import format_memory_mode_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert format_memory_mode_table() in readme


def test_a_precision_override_changes_the_need():
    """`--precision`: a tabled override is looked up; another one moves the mode's peak by the weights' difference."""
    from lens_core.memory_sim import denoiser_weight_gib

    assert mode_vram_need_gib("minimal", precision="fp8") > mode_vram_need_gib("minimal")
    assert mode_vram_need_gib("minimal", precision="nf4") == mode_vram_need_gib("minimal")
    shifted = generation_peak_gib("low", 1024, 1024, 5.0, precision="nf4")
    expected = generation_peak_gib("low", 1024, 1024, 5.0) + denoiser_weight_gib("nf4") - denoiser_weight_gib("none")
    assert math.isclose(shifted, expected)
