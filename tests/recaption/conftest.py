"""Fixtures for the recaption tests: small image datasets made in code, the fake OpenAI server, a CLI runner."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from .fake_server import FakeOpenAIServer, FakeServerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_KEY = "sk-test-DO-NOT-LEAK-4f9c2b"


def write_images(folder: Path, count: int, *, prefix: str = "img", size: tuple[int, int] = (48, 40)) -> list[Path]:
    """``count`` small distinct RGB PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{prefix}{index:03d}.png"
        Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, 120)).save(path)
        paths.append(path)
    return paths


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_bad_images(folder: Path) -> dict[str, str]:
    """Bad files that must be recorded and skipped: key -> the words expected in the failure reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    good = folder / "_full.png"
    Image.new("RGB", (64, 64), "red").save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:80])
    good.unlink()
    (folder / "notanimage.jpg").write_text("this is plain text pretending to be a JPEG")
    (folder / "bomb.png").write_bytes(bomb_png())
    return {"zero": "empty file", "truncated": "truncated", "notanimage": "not an image", "bomb": "decompression bomb"}


def write_awkward_images(folder: Path) -> list[str]:
    """Valid but unusual images that must be converted and captioned: CMYK, 16-bit, animated, palette+alpha."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (40, 30), 40000).save(folder / "sixteen.png")
    frames = [Image.new("RGB", (20, 20), (index * 100, 0, 0)) for index in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.new("RGBA", (24, 24), (0, 0, 255, 90)).save(folder / "alpha.png")
    return ["cmyk", "sixteen", "animated", "alpha"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random LLaVA-style model, built once per test session."""
    from training.recaption.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAIServer]:
    """A clean fake server; tests change ``server.settings`` or make their own for fault cycles."""
    with FakeOpenAIServer(FakeServerSettings()) as server:
        yield server


def run_cli(args: list[str], *, env_key: str | None = TEST_KEY, timeout: float = 90) -> subprocess.CompletedProcess:
    """``python -m training.recaption ARGS`` in a subprocess from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("OPENAI_API_KEY", None)
    if env_key is not None:
        env["RECAPTION_TEST_KEY"] = env_key
    command = [
        sys.executable,
        "-m",
        "training.recaption",
        *args,
        "--api-key-env",
        "RECAPTION_TEST_KEY",
        "--no-progress-bar",
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def progress_items(output_dir: Path) -> list[dict]:
    """Every 'item' event of ``_lens/progress.jsonl``."""
    lines = (output_dir / "_lens" / "progress.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == "item"]
