"""Training configs: YAML into typed dataclasses, presets, overrides, and errors that name the bad key or value."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import PRESETS, build_config, load_config_file, parse_override
from training.train import parse_args, resolve

CONFIG_DIR = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_defaults_plus_data_flag_are_a_complete_run():
    config = resolve(parse_args(["--data", "/some/folder", "--max-steps", "7"]))
    assert config.data.path == "/some/folder"
    assert config.loop.max_steps == 7
    assert config.model.path == "microsoft/Lens-Base"  # the default base for fine-tuning
    assert config.adapter.method == "lora" and not config.adapter.train_modulation


def test_unknown_key_is_an_error_naming_it_and_the_close_match():
    with pytest.raises(ValueError, match=r"'optimizer\.learnig_rate'.*'optimizer\.learning_rate'"):
        build_config({"data": {"path": "x"}, "optimizer": {"learnig_rate": 1e-4}})
    with pytest.raises(ValueError, match="Unknown config key 'trainer'"):
        build_config({"data": {"path": "x"}, "trainer": {}})


def test_wrong_types_and_values_are_named():
    with pytest.raises(ValueError, match=r"'loop\.max_steps' must be an integer, got 'many'"):
        build_config({"data": {"path": "x"}, "loop": {"max_steps": "many"}})
    with pytest.raises(ValueError, match=r"'loop\.gradient_checkpointing' must be true or false, got 'sometimes'"):
        build_config({"data": {"path": "x"}}, {"loop.gradient_checkpointing": "sometimes"})
    with pytest.raises(ValueError, match=r"loop\.max_steps must be >= 1, got 0"):
        build_config({"data": {"path": "x"}}, {"loop.max_steps": 0})
    with pytest.raises(ValueError, match=r"data\.max_bad_fraction must be >= 0 and <= 1, got 1.5"):
        build_config({"data": {"path": "x"}}, {"data.max_bad_fraction": 1.5})
    with pytest.raises(ValueError, match=r"data\.caption_source must be auto, a sidecar extension"):
        build_config({"data": {"path": "x", "caption_source": "captions"}})
    with pytest.raises(ValueError, match=r"adapter\.method must be one of lora, lokr, full; got 'dora'"):
        build_config({"data": {"path": "x"}}, {"adapter.method": "dora"})
    with pytest.raises(ValueError, match="data.path is required"):
        build_config({})
    with pytest.raises(ValueError, match="QLoRA"):
        build_config({"data": {"path": "x"}}, {"adapter.method": "full", "model.base_precision": "nf4"})
    with pytest.raises(ValueError, match=r"data\.buckets entry .* got \[30, 32\]"):
        build_config({"data": {"path": "x", "buckets": [[30, 32]]}})


def test_unambiguous_text_is_converted_by_the_shared_rules():
    config = build_config({"data": {"path": "x"}, "loop": {"max_steps": "20", "gradient_checkpointing": "no"}})
    assert config.loop.max_steps == 20 and config.loop.gradient_checkpointing is False
    assert build_config({"data": {"path": "x"}}, {"optimizer.learning_rate": "2e-4"}).optimizer.learning_rate == 2e-4
    assert build_config({"data": {"path": "x"}}, {"loop.max_steps": 30.0}).loop.max_steps == 30
    with pytest.raises(ValueError, match="must be an integer, got 30.5"):
        build_config({"data": {"path": "x"}}, {"loop.max_steps": 30.5})


def test_resume_reads_the_run_config_the_command_line_wrote(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  path: /data\nloop:\n  max_steps: 33\n")
    config = resolve(parse_args(["--output-dir", str(run), "--resume", "latest"]))
    assert config.loop.max_steps == 33 and config.output_dir == str(run)


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: 12gb\nadapter:\n  rank: 8\ndata:\n  path: /data\n")
    args = parse_args(["--config", str(path), "--set", "adapter.rank=4", "--set", "optimizer.learning_rate=2e-4"])
    config = resolve(args)
    assert config.model.base_precision == PRESETS["12gb"]["model.base_precision"]  # from the preset
    assert config.adapter.rank == 4  # --set beats the file, which beat the preset
    assert config.optimizer.learning_rate == pytest.approx(2e-4)


def test_override_parsing():
    assert parse_override("monitor.sample_size=[512, 768]") == ("monitor.sample_size", [512, 768])
    assert parse_override("loop.ema_decay=0.999") == ("loop.ema_decay", 0.999)
    with pytest.raises(ValueError, match="key=value"):
        parse_override("loop.max_steps")


def test_cpu_preset_needs_no_cuda_parts():
    config = build_config({}, {"preset": "cpu", "data.path": "/data"})
    assert config.model.base_precision == "fp32" and config.optimizer.name == "adamw"
    assert config.loop.mixed_precision == "fp32" and config.data.buckets == "lens-512"


@pytest.mark.parametrize("name", ["12gb", "16gb", "24gb", "48gb"])
def test_example_configs_load(name):
    path = CONFIG_DIR / f"lora_{name}.yaml" if name != "48gb" else CONFIG_DIR / "full_48gb.yaml"
    values = load_config_file(path)
    config = build_config(values, {"data.path": "/data"})
    assert config.preset == name


def test_training_samples_take_at_most_the_engines_step_count():
    from lens_core.presets import MAX_STEPS

    assert build_config({"data": {"path": "."}}, {"monitor.sample_steps": MAX_STEPS}).monitor.sample_steps == MAX_STEPS
    with pytest.raises(ValueError, match="sample_steps"):
        build_config({"data": {"path": "."}}, {"monitor.sample_steps": MAX_STEPS + 1})
