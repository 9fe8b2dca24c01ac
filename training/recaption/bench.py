"""Throughput benchmark of the API backend: sequential vs ``--concurrency 8`` against a fixed-latency local server.

``python -m training.recaption.bench [--images 48] [--latency 0.2] [--concurrency 8]`` (from the repository root)
starts the test suite's fake OpenAI server (``tests/recaption/fake_server.py``) on 127.0.0.1 with a fixed per-request
latency, runs the full recaption pipeline (decode, encode, HTTP, quality, atomic sidecar) over the same small images
twice, and prints images per second for both and the speed-up. The figures go to BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from .config import RecaptionConfig
from .runner import run

logger = logging.getLogger(__name__)


def _make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (256, 192), ((index * 53) % 256, 90, 160)).save(folder / f"bench{index:04d}.png")


def measure(base_url: str, images: int, concurrency: int, root: Path) -> float:
    """Images per second for one run over ``images`` fresh images at ``concurrency``."""
    data = root / f"c{concurrency}"
    _make_images(data, images)
    config = RecaptionConfig(
        inputs=[str(data)],
        base_url=base_url,
        model="bench",
        api_key_env="RECAPTION_BENCH_KEY",
        concurrency=concurrency,
        progress_bar=False,
    )
    started = time.perf_counter()
    summary = run(config)
    elapsed = time.perf_counter() - started
    if summary.captioned != images:
        raise RuntimeError(f"benchmark run captioned {summary.captioned} of {images} images")
    return images / elapsed


def benchmark(images: int = 48, latency: float = 0.2, concurrency: int = 8) -> dict[str, float]:
    """Run both measurements and return the figures."""
    # The fake server is test code; the benchmark borrows it (run from the repository root, where `tests` is found).
    from tests.recaption.fake_server import FakeOpenAIServer, FakeServerSettings

    with (
        tempfile.TemporaryDirectory(prefix="recaption-bench-") as root,
        FakeOpenAIServer(FakeServerSettings(latency=latency)) as server,
    ):
        sequential = measure(server.base_url, images, 1, Path(root))
        concurrent = measure(server.base_url, images, concurrency, Path(root))
    return {
        "images": images,
        "latency_s": latency,
        "concurrency": concurrency,
        "sequential_img_per_s": round(sequential, 2),
        "concurrent_img_per_s": round(concurrent, 2),
        "speedup": round(concurrent / sequential, 2),
        "cpu_cores": os.cpu_count() or 0,
    }


def main() -> None:
    """Print the benchmark as one JSON line plus a readable summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = benchmark(args.images, args.latency, args.concurrency)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.write(
        f"sequential {result['sequential_img_per_s']} img/s, concurrency {args.concurrency} "
        f"{result['concurrent_img_per_s']} img/s: {result['speedup']}x\n"
    )


if __name__ == "__main__":
    main()
