"""The training memory simulation: agreement with real CPU runs, the cached preset table, and the fit checks."""

from __future__ import annotations

import json
import math

import pytest

from training.config import PRESET_ORDER
from training.memory_estimate import (
    CHECK_TRANSFORMER_CONFIG,
    CHECK_VAE_CONFIG,
    fit_problem,
    fitting_preset,
    load_training_table,
    preset_config,
    preset_peaks,
    preset_suggestion,
    simulate_check_rows,
    simulate_training,
    suggest_preset,
    training_peak,
)

# The simulator and the real run execute the same trainer code; the difference is a few tensors' worth.
CALIBRATION_TOLERANCE = 0.02
# Libraries create a few tiny tensors once per process and keep them: the first simulation in a process counts them.
TABLE_TOLERANCE_GIB = 8 * 1024 / 2**30


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("24gb", {"optimizer.name": "adamw"}),  # LoRA on a bf16 base, AdamW (8-bit AdamW needs CUDA to run for real)
        ("48gb", {}),  # full fine-tuning in float32 with Adafactor
    ],
)
def test_simulated_step_matches_a_real_cpu_run(preset, overrides):
    """One optimizer step (and the sampling) of a scaled-down denoiser: simulated on fake tensors and run for real
    on the CPU, both counted by the same live-bytes tracker."""
    config = preset_config(preset, {**overrides, "monitor.sample_size": [128, 128]})
    args = (config, (128, 128), CHECK_TRANSFORMER_CONFIG, CHECK_VAE_CONFIG)
    simulated, real = simulate_training(*args, fake=True), simulate_training(*args, fake=False)
    assert real.step_peak_gib > real.weights_gib > 0
    for field in ("weights_gib", "optimizer_state_gib", "step_peak_gib", "sample_peak_gib"):
        assert math.isclose(getattr(simulated, field), getattr(real, field), rel_tol=CALIBRATION_TOLERANCE), field


def test_cached_table_equals_a_fresh_simulation_at_small_size():
    """When this fails, regenerate: python -m training.bench_memory --simulate --write-table"""
    cached = load_training_table()["check"]
    fresh = json.loads(json.dumps(simulate_check_rows()))  # as the table stores it (tuples become lists)
    assert [(row["preset"], row["area"], row["case"]) for row in cached] == [
        (row["preset"], row["area"], row["case"]) for row in fresh
    ]
    for old, new in zip(cached, fresh):
        for key, value in new["peak"].items():
            assert math.isclose(old["peak"][key], value, abs_tol=TABLE_TOLERANCE_GIB), (new["preset"], key)


def test_every_preset_fits_the_card_it_is_named_for():
    for name, peak in preset_peaks().items():
        card = float(name.removesuffix("gb"))
        assert peak.card_gib <= card, f"{name} needs {peak.card_gib:.1f} GiB"
    needs = [peak.card_gib for peak in preset_peaks().values()]
    assert needs == sorted(needs)  # PRESET_ORDER goes from the smallest need to the largest


def test_fit_check_and_advice_come_from_the_simulated_table():
    largest, smallest = PRESET_ORDER[-1], PRESET_ORDER[0]
    full = preset_config(largest)
    need = training_peak(full).card_gib
    assert fit_problem(full, need + 0.1) is None
    message = fit_problem(full, 15.6)
    assert message is not None and "GPU has 15.6 GiB" in message and "--preset" in message
    assert "simulated" in message
    assert "no preset fits" in fit_problem(preset_config(smallest), 2.0)
    assert fitting_preset(80.0) == largest and fitting_preset(2.0) is None
    assert suggest_preset(None) is None


def test_train_tab_suggestion_names_the_largest_preset_that_fits():
    peaks = preset_peaks()
    for name in PRESET_ORDER:
        value, why = preset_suggestion(peaks[name].card_gib + 0.05)
        assert value == name and f"{peaks[name].card_gib:.1f}" in why
    value, why = preset_suggestion(None)
    assert value in PRESET_ORDER and "No GPU detected" in why


def test_a_config_outside_the_table_is_simulated_on_the_spot():
    """A toy denoiser and VAE (not the real Lens) are simulated as they are, in seconds; a saved config's extra keys
    are ignored."""
    config = preset_config("24gb", {"adapter.rank": 4, "data.buckets": [[128, 128]], "monitor.sample_size": [128, 128]})
    saved = {**CHECK_TRANSFORMER_CONFIG, "_class_name": "LensTransformer2DModel", "_diffusers_version": "0.42.1"}
    peak = training_peak(config, saved, {**CHECK_VAE_CONFIG, "_class_name": "AutoencoderKLFlux2"})
    assert 0 < peak.weights_gib < peak.step_peak_gib < 0.05


def test_readme_preset_table_is_the_generated_one():
    from pathlib import Path

    from training.bench_memory import format_preset_summary

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert format_preset_summary(load_training_table()) in readme


def test_every_preset_is_in_the_cached_table():
    """The app reads preset needs at start-up and never simulates them there: the table must have every preset."""
    from training.memory_estimate import cached_training_peak

    for name in PRESET_ORDER:
        assert cached_training_peak(preset_config(name)) is not None, name
