"""Captioner and trainer see the same pixels for every file of a messy folder (one reader: lens_core.image_io)."""

from __future__ import annotations

import numpy as np
from messy_folder import GOOD_KEYS, SIZE, make_messy_folder

from lens_core.image_io import BadImageError
from training.data import discover_samples
from training.recaption.config import RecaptionConfig
from training.recaption.runner import RecaptionRunner


def _decode(load):
    try:
        return np.asarray(load())
    except BadImageError as error:
        return error.reason


def test_captioner_and_trainer_decode_every_file_alike(tmp_path):
    folder = make_messy_folder(tmp_path / "photos")
    (folder / "plain.txt").write_text("a plain picture\n")  # the trainer lists captioned images only
    config = RecaptionConfig(inputs=[str(folder)], output_dir=str(tmp_path / "out"), max_image_side=4096)
    runner = RecaptionRunner(config)
    captioner = {item.key: _decode(runner._job(item).load_image) for item in runner.list_items()}
    trainer = {sample.key: _decode(sample.load_image) for sample in discover_samples(folder)}
    assert sorted(captioner) == sorted(trainer) == sorted([*GOOD_KEYS, "broken"])
    for key in GOOD_KEYS:
        assert isinstance(captioner[key], np.ndarray) and np.array_equal(captioner[key], trainer[key]), key
        assert captioner[key].ndim == 3 and captioner[key].shape[2] == 3, key  # 8-bit RGB
    assert "truncated" in captioner["broken"] and captioner["broken"] == trainer["broken"]
    # What they agree on is what an image viewer shows: upright, 16-bit not white, transparency on white.
    assert captioner["rotated"].shape == (SIZE, SIZE * 2 // 3, 3)
    assert 20 < captioner["deep"].mean() < 235
    assert (captioner["glass"][:, : SIZE // 2] == 255).all()
