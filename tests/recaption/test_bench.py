"""Concurrency of the API backend, checked by what the server sees (no clocks): --concurrency 8 keeps 8 requests in
flight, 1 keeps one. The throughput figures themselves are measured by `python -m training.recaption.bench` and go to
BENCHMARKS.md with the machine they were measured on."""

from __future__ import annotations

import pytest

from training.recaption.bench import benchmark
from training.recaption.config import RecaptionConfig
from training.recaption.runner import run

from .conftest import write_images
from .fake_server import FakeOpenAIServer, FakeServerSettings

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_requests_in_flight_match_the_concurrency(tmp_path, concurrency):
    write_images(tmp_path / "data", 20)
    # The server holds the first requests until `concurrency` are in flight at once, so the count is exact.
    with FakeOpenAIServer(FakeServerSettings(gather=concurrency)) as server:
        config = RecaptionConfig(
            inputs=[str(tmp_path / "data")], base_url=server.base_url, concurrency=concurrency, progress_bar=False
        )
        summary = run(config)
    assert summary.captioned == 20 and len(server.requests) == 20
    assert server.max_in_flight == concurrency


def test_benchmark_reports_both_rates():
    result = benchmark(images=4, latency=0.0, concurrency=2)
    assert result["images"] == 4 and result["concurrency"] == 2
    assert result["sequential_img_per_s"] > 0 and result["concurrent_img_per_s"] > 0 and result["speedup"] > 0
