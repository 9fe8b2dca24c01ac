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
        ({"backend": "azure"}, "backend must be one of openai, local; got 'azure'"),
        ({"formats": ["csv"]}, "formats must be one of sidecar, jsonl, webdataset, parquet; got 'csv'"),
        ({"concurrency": 0}, "concurrency must be >= 1, got 0"),
        ({"concurrency": "four"}, "Config key 'concurrency' must be an integer, got 'four' (str)"),
        ({"concurrency": 2.5}, "Config key 'concurrency' must be an integer, got 2.5"),
        ({"overwrite": "maybe"}, "Config key 'overwrite' must be true or false, got 'maybe'"),
        ({"shard": "4/4"}, "shard='4/4' must be 'auto' or i/n with 0 <= i < n"),
        ({"precision": "int3"}, "precision must be one of auto"),
        ({"template": "poem"}, "template must be one of dense, short, tags; got 'poem'"),
        ({"base_url": "localhost:8000"}, "must start with http:// or https://"),
        ({"inputs": []}, "inputs is empty"),
        ({"caption_source": "captions/"}, "caption_source='captions/' must be auto"),
        # A caption written in place must never land on an image or a dataset file.
        ({"sidecar_extension": ".jpg"}, "sidecar_extension='.jpg' must be dot-separated"),
        ({"sidecar_extension": ".lens.PNG"}, "not end in an image or dataset extension"),
        ({"sidecar_extension": ".jsonl"}, "would overwrite that file"),
        ({"sidecar_extension": ".."}, "sidecar_extension='..' must be"),
        ({"sidecar_extension": "txt"}, "sidecar_extension='txt' must be"),
        ({"sidecar_extension": ".lens/../x"}, "must be dot-separated"),
        ({"sidecar_extension": ""}, "sidecar_extension='' must be"),
    ],
)
def test_validation_names_bad_value_and_allowed(changes, message):
    values = {"inputs": ["data"], **changes}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RecaptionConfig.from_dict(values)


@pytest.mark.parametrize("extension", [".txt", ".lens.txt", ".caption", ".dense_v2.txt"])
def test_usual_sidecar_extensions_are_accepted(extension):
    assert (
        RecaptionConfig.from_dict({"inputs": ["data"], "sidecar_extension": extension}).sidecar_extension == extension
    )


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match=r"Unknown config key 'concurency'. Did you mean 'concurrency'\?"):
        RecaptionConfig.from_dict({"inputs": ["x"], "concurency": 8})


def test_values_are_converted_by_one_clear_rule():
    # The same mechanism as TrainConfig: unambiguous text becomes the field's type, anything else is refused.
    config = RecaptionConfig.from_dict({"inputs": ["x"], "concurrency": "4", "overwrite": "no", "temperature": "0"})
    assert (config.concurrency, config.overwrite, config.temperature) == (4, False, 0.0)
    assert RecaptionConfig.from_dict({"inputs": ["x"], "overwrite": "YES"}).overwrite is True
    assert RecaptionConfig(inputs=["x"], concurrency="8").validate().concurrency == 8  # keyword arguments too
    config, _ = resolve_config(["data", "--concurrency", "3", "--target-words", "40", "--no-overwrite"])
    assert (config.concurrency, config.target_words, config.overwrite) == (3, 40, False)
    with pytest.raises(ValueError, match="'max_retries' must be an integer, got 'lots'"):
        resolve_config(["data", "--max-retries", "lots"])


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
