"""Shared fixtures: a tiny random Lens in the official layout, built once per test session."""

from __future__ import annotations

import os

# Tests are offline by construction; this also stops bitsandbytes' CPU path from looking for kernels on the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lens_core.tiny import build_tiny_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `slow` tests unless LENS_WEIGHTS_DIR names a weights folder."""
    has_cuda = torch.cuda.is_available()
    weights = os.environ.get("LENS_WEIGHTS_DIR")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not (weights and os.path.isdir(weights)):
            item.add_marker(pytest.mark.skip(reason="needs the real weights: set LENS_WEIGHTS_DIR to a Lens folder"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random Lens checkpoint (official diffusers layout)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-lens") / "Lens-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    """The tiny checkpoint loaded in float32 on CPU. Tests must not change its state (build their own to do that)."""
    from lens_core import LensPipeline

    return LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
