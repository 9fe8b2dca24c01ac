"""Gradio-free helpers of the Generate tab: presets, number parsing, and the streaming runner's cancel on close."""

from __future__ import annotations

import pytest

from app.generate_tab import ASPECT_CUSTOM, as_int, aspect_for_size, aspect_presets, example_prompts, stream_generation
from app.session import SessionState
from lens_core.engine import EngineConfig, GenerationRequest, GenerationResult, LensEngine, ProgressEvent
from lens_core.presets import RESOLUTIONS


def test_aspect_presets_cover_both_rows_of_the_table():
    presets = aspect_presets()
    assert len(presets) == 18
    assert set(presets.values()) == {size for row in RESOLUTIONS.values() for size in row.values()}
    assert aspect_for_size(1376, 768).startswith("16:9") and aspect_for_size(1440, 1440).startswith("1:1")
    assert aspect_for_size(640, 480) == ASPECT_CUSTOM


@pytest.mark.parametrize("value", [1.5, "12", None, True, float("nan"), float("inf")])
def test_as_int_refuses_instead_of_rounding(value):
    with pytest.raises(ValueError, match="whole number"):
        as_int("width", value)


def test_as_int_accepts_integral_numbers():
    assert as_int("width", 64.0) == 64 and as_int("seed", None, allow_none=True) is None


def test_session_state_copies_are_independent():
    import copy

    state = SessionState()
    state.cancel.set()
    fresh = copy.deepcopy(state)
    assert not fresh.cancel.is_set()
    old = state.cancel
    assert state.new_job() is not old and not state.cancel.is_set()


def test_example_prompts_are_read_from_assets():
    prompts = example_prompts()
    assert len(prompts) >= 4 and all(prompt.strip() == prompt and prompt for prompt in prompts)


def test_streaming_yields_progress_then_result_and_cancels_when_closed(tiny_checkpoint, tmp_path):
    engine = LensEngine(EngineConfig(output_dir=tmp_path, model=str(tiny_checkpoint)))
    engine.load()
    request = GenerationRequest(prompt="a fox", width=64, height=64, num_inference_steps=3, preview_every=1)
    items = list(stream_generation(engine, request, SessionState().cancel))
    assert [type(item) for item in items] == [ProgressEvent] * 3 + [GenerationResult]
    assert items[0].preview is not None and items[-1].paths[0].is_file()

    # A browser that goes away closes the generator: the job must stop instead of running on.
    cancel = SessionState().cancel
    stream = stream_generation(
        engine, GenerationRequest(prompt="a fox", width=64, height=64, num_inference_steps=50), cancel
    )
    assert isinstance(next(stream), ProgressEvent)
    stream.close()
    assert cancel.is_set()
    with engine.lock:  # the worker released the engine: it stopped at its next step
        pass
    assert len(list((tmp_path / "images").glob("*.png"))) == 1  # the cancelled job saved nothing


def test_zero_gpu_reservations():
    from app.generate_tab import _gpu_seconds, api_request
    from app.session import gpu_task

    def handler():
        return 1

    def seconds(*args) -> int:
        return _gpu_seconds(api_request(*args, []))

    assert gpu_task(lambda *args: 10)(handler) is handler  # no `spaces` package: unchanged
    default_steps = seconds("p", "", 1024, 1024, -1, -1, -1, "Lens", 1, 1)
    assert default_steps > seconds("p", "", 1024, 1024, 4, 1.0, -1, "Lens-Turbo", 1, 1)
    assert seconds("p", "", 1024, 1024, 20, 5.0, -1, "Lens", 2, 2) > seconds(
        "p", "", 1024, 1024, 20, 5.0, -1, "Lens", 1, 1
    )
