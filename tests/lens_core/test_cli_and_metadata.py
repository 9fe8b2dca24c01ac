"""`python -m lens_core generate` end to end, and the PNG settings it embeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from lens_core.metadata import ImageSettings, parse_a1111, read_settings, save_png

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path):
    env = {"LENS_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "lens_core", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_generate_command_writes_pngs_with_settings(tmp_path):
    out = tmp_path / "out" / "fox.png"
    result = _run(
        [
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "a red fox",
            "--seed",
            "5",
            "--width",
            "64",
            "--height",
            "48",
            "--num-images",
            "2",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    first, second = out.with_name("fox_1.png"), out.with_name("fox_2.png")
    assert Image.open(first).size == (64, 48)
    settings = read_settings(second)
    assert (settings.prompt, settings.seed, settings.num_inference_steps, settings.variant) == (
        "a red fox",
        6,
        4,
        "Lens-Turbo",
    )
    assert settings.prompt_date == "2026-05-23"
    assert "Steps: 4" in Image.open(first).text["parameters"]
    # Same seed, same image (a batch of 2 and a batch of 1 may differ by float rounding: at most 1 level).
    again = _run(
        [
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "a red fox",
            "--seed",
            "6",
            "--width",
            "64",
            "--height",
            "48",
            "--out",
            str(tmp_path / "again.png"),
        ],
        tmp_path,
    )
    assert again.returncode == 0
    difference = np.abs(
        np.asarray(Image.open(tmp_path / "again.png"), dtype=int) - np.asarray(Image.open(second), dtype=int)
    )
    assert difference.max() <= 1


def test_generate_command_refuses_bad_sizes(tmp_path):
    result = _run(
        ["generate", "--model", "tiny", "--prompt", "x", "--width", "100", "--out", str(tmp_path / "x.png")], tmp_path
    )
    assert result.returncode == 2
    assert "multiple of 16" in result.stderr


def test_settings_round_trip_and_a1111_import(tmp_path):
    settings = ImageSettings(
        prompt="a cat, sitting: calmly",
        negative_prompt="blurry",
        seed=42,
        num_inference_steps=20,
        guidance_scale=4.5,
        width=832,
        height=1248,
        variant="Lens",
        loras=[{"name": "style", "weight": 0.8}],
    )
    path = save_png(Image.new("RGB", (16, 16)), tmp_path / "a.png", settings)
    assert read_settings(path) == settings
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left beside it
    a1111 = "masterpiece, a castle\nat dusk\nNegative prompt: lowres\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1234, Size: 512x768, Model: sd15"
    parsed = parse_a1111(a1111)
    assert parsed == {
        "prompt": "masterpiece, a castle\nat dusk",
        "negative_prompt": "lowres",
        "num_inference_steps": 30,
        "guidance_scale": 7.0,
        "seed": 1234,
        "width": 512,
        "height": 768,
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111)
    foreign = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=info)
    assert read_settings(foreign).seed == 1234


def test_images_without_settings_or_not_images_are_refused(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="carries no generation settings"):
        read_settings(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="not a readable image"):
        read_settings(junk)
