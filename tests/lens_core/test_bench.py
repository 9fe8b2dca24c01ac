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
        assert row["image_s"] > 0 and row["step_s"] > 0 and row["encode_s"] > 0 and row["peak_ram_gb"] > 0
        assert row["cosine_to_full"] >= 0.98


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--modes got \\['huge'\\]"):
        main(["--size", "tiny", "--modes", "huge"])
    with pytest.raises(ValueError, match="multiples of 16"):
        main(["--size", "tiny", "--resolutions", "30"])
