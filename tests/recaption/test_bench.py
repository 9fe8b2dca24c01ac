"""The throughput claim: --concurrency 8 against a 200 ms server is at least 6x the sequential rate."""

from __future__ import annotations

import pytest

from training.recaption.bench import benchmark

pytestmark = pytest.mark.timeout(60)


def test_concurrency_8_is_at_least_6x_sequential():
    result = benchmark(images=24, latency=0.2, concurrency=8)
    assert result["sequential_img_per_s"] < 5.0  # bounded by the 200 ms latency
    assert result["speedup"] >= 6.0, result
