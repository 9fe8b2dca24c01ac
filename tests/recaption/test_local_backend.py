"""The local transformers backend with a tiny random LLaVA-style model built in code (CPU, no download)."""

from __future__ import annotations

import json

import pytest

from training.recaption.config import RecaptionConfig
from training.recaption.runner import run

from .conftest import progress_items, run_cli, write_awkward_images, write_bad_images, write_images

pytestmark = pytest.mark.timeout(120)


def test_cli_local_backend_batches_and_skips_bad_images(tmp_path, tiny_model):
    data = tmp_path / "data"
    write_images(data, 5)
    bad = write_bad_images(data / "bad")
    awkward = write_awkward_images(data / "odd")
    args = [
        str(data),
        "--backend",
        "local",
        "--model",
        str(tiny_model),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "12",
        "--formats",
        "sidecar",
        "jsonl",
        "--precision",
        "fp32",
    ]
    result = run_cli(args)
    assert result.returncode == 1, result.stderr  # the bad images fail
    items = {item["key"]: item for item in progress_items(data)}
    captioned = {key for key, item in items.items() if item["status"] == "ok"}
    assert captioned == {f"img00{i}" for i in range(5)} | {f"odd/{name}" for name in awkward}
    assert {key for key, item in items.items() if item["status"] == "failed"} == {f"bad/{key}" for key in bad}
    for key in captioned:
        caption = (data / f"{key}.txt").read_text().strip()
        assert caption and caption == items[key]["caption"] and items[key]["words"] == len(caption.split())
    assert len((data / "metadata.jsonl").read_text().splitlines()) == len(captioned)
    report = json.loads((data / "_lens" / "recaption_report.json").read_text())
    assert report["captioned"] == len(captioned) and report["words"]["max"] <= 12


def test_local_backend_in_process_resume(tmp_path, tiny_model):
    write_images(tmp_path / "data", 4)
    config = RecaptionConfig(
        inputs=[str(tmp_path / "data")],
        backend="local",
        model=str(tiny_model),
        batch_size=2,
        max_new_tokens=6,
        progress_bar=False,
        limit=3,
    )
    first = run(config)
    assert (first.captioned, first.pending, first.exit_code) == (3, 1, 0)
    config.limit = None
    second = run(config)
    assert (second.captioned, second.pending, second.skipped) == (4, 0, 3)


def test_quantized_modes_need_cuda(tmp_path, tiny_model):
    from training.recaption.backends.local_backend import model_loading_arguments

    with pytest.raises(ValueError, match="precision='4bit' needs a CUDA GPU"):
        model_loading_arguments("4bit", "cpu")
    assert str(model_loading_arguments("auto", "cpu")["dtype"]) == "torch.float32"
    assert str(model_loading_arguments("bf16", "cpu")["dtype"]) == "torch.bfloat16"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit"])
def test_local_backend_on_gpu_memory_modes(tmp_path, tiny_model, precision):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if precision != "bf16":
        pytest.importorskip("bitsandbytes")
    write_images(tmp_path / "data", 3)
    config = RecaptionConfig(
        inputs=[str(tmp_path / "data")],
        backend="local",
        model=str(tiny_model),
        precision=precision,
        max_new_tokens=6,
        progress_bar=False,
    )
    summary = run(config)
    assert (summary.captioned, summary.failed) == (3, 0)
