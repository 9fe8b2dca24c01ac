"""The CPU micro-benchmark on the tiny model: every section reports its rows (figures go to BENCHMARKS.md, not here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lens_core.bench_cpu import SECTIONS, main


def test_micro_benchmark_reports_every_section(tmp_path, capsys):
    out = tmp_path / "micro.md"
    assert main(["--size", "tiny", "--dtypes", "fp32", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert table.startswith("Device: CPU") and table == capsys.readouterr().out.strip() + "\n"
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    sections = {row[0].removeprefix("| ") for row in rows}
    assert sections == {"RoPE", "MXFP4 dequantize", "text encoding", "denoiser forward", "whole pipeline"}
    assert len(SECTIONS) == len(sections)
    encoding = [row[1] for row in rows if row[0] == "| text encoding"]
    assert "ours, dense experts resident (full/fast)" in encoding
    assert "transformers, convert_moe_packed_tensors per call" in encoding
    assert all(float(row[3]) > 0 for row in rows)


def test_micro_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--sections got \\['warp'\\]"):
        main(["--size", "tiny", "--sections", "warp"])
    with pytest.raises(ValueError, match="--dtypes got \\['fp8'\\]"):
        main(["--size", "tiny", "--dtypes", "fp8"])


def test_bench_command_dispatches_micro():
    result = subprocess.run(
        [sys.executable, "-m", "lens_core.bench", "micro", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "python -m lens_core.bench_cpu" in result.stdout
