"""The memory benchmark runs end to end in its tiny CPU form and reports one JSON line per preset and size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_reports_figures(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.bench_memory",
            "--tiny",
            "--presets",
            "12gb",
            "24gb",
            "--sizes",
            "32",
            "64",
            "--steps",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["preset"], r["size"]) for r in rows] == [("12gb", 32), ("12gb", 64), ("24gb", 32), ("24gb", 64)]
    for row in rows:
        assert row["model"] == "tiny" and row["device"] == "cpu"
        assert row["peak_gib"] > 0 and row["seconds_per_step"] > 0 and row["loss"] > 0
    assert rows[0]["base_precision"] == "fp8"  # NF4 needs CUDA: the CPU run stores the base as fp8 and says so


def test_real_size_benchmark_needs_cuda_and_says_so():
    import torch

    if torch.cuda.is_available():
        return
    result = subprocess.run(
        [sys.executable, "-m", "training.bench_memory"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
