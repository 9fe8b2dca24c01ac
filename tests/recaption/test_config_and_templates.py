"""Config validation, the command line's argument handling, and prompt templates."""

from __future__ import annotations

import pytest

from training.recaption.__main__ import resolve_config
from training.recaption.config import RecaptionConfig
from training.recaption.templates import PRESETS, PromptTemplate

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "azure"}, "backend='azure' is not allowed; choose one of openai, local"),
        ({"formats": ["csv"]}, "formats='csv' is not allowed"),
        ({"concurrency": 0}, "concurrency=0 must be >= 1"),
        ({"shard": "4/4"}, "shard='4/4' must be 'auto' or i/n with 0 <= i < n"),
        ({"precision": "int3"}, "precision='int3' is not allowed"),
        ({"template": "poem"}, "template='poem' is not allowed; choose one of dense, short, tags"),
        ({"base_url": "localhost:8000"}, "must start with http:// or https://"),
        ({"inputs": []}, "inputs is empty"),
    ],
)
def test_validation_names_bad_value_and_allowed(changes, message):
    values = {"inputs": ["data"], **changes}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RecaptionConfig.from_dict(values)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['concurency'\]"):
        RecaptionConfig.from_dict({"inputs": ["x"], "concurency": 8})


def test_shard_auto_reads_accelerate_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert RecaptionConfig(inputs=["x"]).validate().shard_position() == (2, 3)
    assert RecaptionConfig(inputs=["x"], shard="1/4").validate().shard_position() == (1, 4)


def test_api_key_on_command_line_is_refused_without_echo():
    secret = "sk-live-abcdef123456"
    for argv in (["data", "--api-key", secret], ["data", f"--api-key={secret}"]):
        with pytest.raises(ValueError) as raised:
            resolve_config(argv)
        assert secret not in str(raised.value)
        assert "--api-key-env" in str(raised.value)
    # A key pasted where the variable NAME belongs is refused without being repeated.
    with pytest.raises(ValueError) as raised:
        resolve_config(["data", "--api-key-env", secret])
    assert secret not in str(raised.value)


def test_command_line_overrides_config_file(tmp_path):
    path = tmp_path / "config.json"
    RecaptionConfig(inputs=["a"], concurrency=3, template="short").validate().to_json_file(path)
    config, _ = resolve_config(["--config", str(path), "--concurrency", "8", "--formats", "jsonl", "parquet"])
    assert (config.inputs, config.concurrency, config.template, config.formats) == (
        ["a"],
        8,
        "short",
        ["jsonl", "parquet"],
    )


def test_dense_template_asks_for_lens_style_and_uses_hint():
    template = PromptTemplate.resolve("dense")
    assert template.target_words == 100
    plain = template.render(file_name="a.png", folder="cats")
    for word in (
        "colour",
        "shape",
        "size",
        "texture",
        "quantity",
        "visible text",
        "spatial",
        "background",
        "no speculation",
    ):
        assert word in plain
    assert "alt-text" not in plain
    hinted = template.render(original_caption="Eiffel  tower\nat night", tags="paris, tower")
    assert '"Eiffel tower at night"' in hinted and "Tags given with the image: paris, tower." in hinted


def test_custom_template_variables_and_errors():
    template = PromptTemplate.resolve(
        "short", "Caption {file_name} in {folder} in {target_words} words.", target_words=12
    )
    assert template.render(file_name="x.jpg", folder="dogs") == "Caption x.jpg in dogs in 12 words."
    with pytest.raises(ValueError, match=r"unknown variable\(s\) \['filename'\]; allowed: original_caption"):
        PromptTemplate.resolve("dense", "Describe {filename}")
    assert set(PRESETS) == {"dense", "short", "tags"}
