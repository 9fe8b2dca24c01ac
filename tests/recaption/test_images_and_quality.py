"""The recaption test images through the shared reader (lens_core.image_io), and caption quality flags."""

from __future__ import annotations

import pytest

from lens_core.image_io import BadImageError, load_image
from training.recaption.quality import TokenCounter, assess, is_repetitive

from .conftest import write_awkward_images, write_bad_images

pytestmark = pytest.mark.timeout(30)


def test_bad_images_raise_with_reason(tmp_path):
    expected = write_bad_images(tmp_path)
    for key, words in expected.items():
        path = next(tmp_path.glob(f"{key}.*"))
        with pytest.raises(BadImageError, match=words) as raised:
            load_image(path, max_pixels=50_000_000)
        assert raised.value.path == str(path)


def test_awkward_images_become_rgb(tmp_path):
    for key in write_awkward_images(tmp_path):
        path = next(tmp_path.glob(f"{key}.*"))
        decoded = load_image(path, max_pixels=50_000_000, max_side=16)
        assert decoded.image.mode == "RGB" and max(decoded.image.size) <= 16
    animated = load_image(tmp_path / "animated.gif")
    assert animated.notes == ["animated: first of 3 frames used"]
    sixteen = load_image(tmp_path / "sixteen.png")
    assert any("scaled to 8-bit" in note for note in sixteen.notes)


def test_quality_flags():
    counter = TokenCounter()
    kwargs = {"target_words": 100, "token_limit": 415, "counter": counter}
    good = "A red brick house with a grey slate roof stands behind a low white fence. " * 6
    assert assess(good.replace("A red", "One red", 1), original="", **kwargs).flags == ["repetitive"]
    varied = " ".join(f"word{index}" for index in range(100))
    assert assess(varied, original="", **kwargs).flags == []
    assert "too_short" in assess("A cat.", original="", **kwargs).flags
    assert "too_long" in assess(" ".join(f"w{index}," for index in range(400)), original="", **kwargs).flags
    assert "refusal" in assess("I'm sorry, but I can't help with that image.", original="", **kwargs).flags
    contradiction = assess(varied + " dog grass", original="a tabby kitten sleeping on velvet", **kwargs)
    assert "contradicts_original" in contradiction.flags
    agreeing = assess(varied + " kitten", original="a tabby kitten sleeping on velvet", **kwargs)
    assert "contradicts_original" not in agreeing.flags


def test_repetition_detector():
    looping = "the cat sat on the mat " * 3
    plain = "a small green frog sits on a wide lily pad in a quiet pond"
    assert is_repetitive(looping.split())
    assert not is_repetitive(plain.split())
