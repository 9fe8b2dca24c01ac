"""Variant presets, resolutions and the sampler's mu, against the numbers in LENS_SPEC."""

from __future__ import annotations

import pytest

from lens_core.presets import RESOLUTIONS, TRAINING_BUCKETS, VARIANTS, compute_mu, get_variant, resolve_size


@pytest.mark.parametrize(
    "tokens,steps,expected",
    [(4096, 4, 2.29118), (4096, 20, 2.19802), (4096, 50, 2.02335), (8100, 4, 1.82775), (8100, 50, 1.82775)],
)
def test_mu_matches_the_published_examples(tokens, steps, expected):
    assert compute_mu(tokens, steps) == pytest.approx(expected, abs=1e-5)


def test_variant_presets():
    assert (VARIANTS["Lens"].num_inference_steps, VARIANTS["Lens"].guidance_scale) == (20, 5.0)
    assert (VARIANTS["Lens-Turbo"].num_inference_steps, VARIANTS["Lens-Turbo"].guidance_scale) == (4, 1.0)
    assert (VARIANTS["Lens-Base"].num_inference_steps, VARIANTS["Lens-Base"].guidance_scale) == (50, 5.0)
    assert (
        VARIANTS["Lens"].repo_ids[0] == "microsoft/Lens" and "YuCollection/Lens-Diffusers" in VARIANTS["Lens"].repo_ids
    )
    assert get_variant("turbo").name == "Lens-Turbo"
    with pytest.raises(ValueError, match="Unknown Lens variant"):
        get_variant("Lens-XL")


def test_resolution_tables():
    assert RESOLUTIONS[1024]["9:16"] == (768, 1376) and RESOLUTIONS[1440]["2:1"] == (2080, 1040)
    for table in (*RESOLUTIONS.values(), *TRAINING_BUCKETS.values()):
        assert len(table) == 9
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in table.values())
    assert TRAINING_BUCKETS[512]["16:9"] == (672, 384)


def test_resolve_size():
    assert resolve_size() == (1024, 1024)
    assert resolve_size(aspect_ratio="16:9") == (768, 1376)  # (height, width)
    assert resolve_size(base_resolution=1440, aspect_ratio="3:4") == (1616, 1216)
    assert resolve_size(height=48, width=64) == (48, 64)
    for bad in [dict(height=1000, width=1024), dict(height=0, width=16), dict(height=16.0, width=16)]:
        with pytest.raises(ValueError, match="multiple of 16"):
            resolve_size(**bad)
    with pytest.raises(ValueError, match="aspect_ratio must be one of"):
        resolve_size(aspect_ratio="5:4")
    with pytest.raises(ValueError, match="base_resolution must be one of"):
        resolve_size(base_resolution=768)
