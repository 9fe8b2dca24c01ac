"""LensEngine on the tiny checkpoint: validation, saving with settings, progress, cancel, LoRA errors, loading errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens_core.engine import (
    EngineConfig,
    EngineNotReady,
    GenerationCancelled,
    GenerationRequest,
    LensEngine,
    estimate_gpu_seconds,
    latent_preview,
    list_loras,
    safe_image_path,
)
from lens_core.lora import LensLora, save_lora
from lens_core.metadata import read_settings

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    """An engine serving the session's tiny checkpoint (loaded once for the module)."""
    engine = LensEngine(EngineConfig(output_dir=tmp_path_factory.mktemp("engine-out"), model=str(tiny_checkpoint)))
    engine.load(variant="Lens-Turbo")
    return engine


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"width": 72}, "multiple of 16"),
        ({"height": 32}, "from 64 to 2560"),
        ({"width": 2560, "height": 2560}, "the limit is"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": "5"}, "guidance_scale"),
        ({"seed": -3}, "seed"),
        ({"batch_count": 0}, "batch_count"),
        ({"batch_size": 99}, "batch_size"),
        ({"variant": "Lens-Ultra"}, "Unknown Lens variant"),
        ({"loras": [("a.safetensors", 9.0)]}, "LoRA weight"),
        ({"loras": ["a.safetensors"]}, "(name, weight)"),
    ],
)
def test_request_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**{"prompt": "a cat", **SMALL, **changes})


def test_request_accepts_short_variant_names():
    assert GenerationRequest(prompt="a cat", variant="turbo", **SMALL).variant == "Lens-Turbo"


def test_safe_image_path_never_leaves_the_output_folder(tmp_path):
    for stem in ("../../etc/passwd", "/abs/olute", "..", "a\\..\\b", "nul\x00byte", ""):
        path = safe_image_path(tmp_path, stem)
        assert path.parent == (tmp_path / "images").resolve()
        assert path.suffix == ".png"
        assert ".." not in path.name


def test_latent_preview_is_a_small_rgb_image():
    import torch

    tokens = torch.randn(2, 4 * 6, 128)  # [B, h*w, 128] for h=4, w=6
    preview = latent_preview(tokens, 4, 6, size=96)
    assert preview.mode == "RGB"
    assert preview.size == (6 * 16, 4 * 16)
    assert np.asarray(preview).std() > 0


def test_gpu_time_estimate_grows_with_work_and_is_capped():
    small = estimate_gpu_seconds(4, 1024, 1024, 1, 1.0)
    assert small < estimate_gpu_seconds(20, 1024, 1024, 1, 5.0) < estimate_gpu_seconds(20, 1440, 1440, 4, 5.0)
    assert estimate_gpu_seconds(200, 2048, 1024, 16, 5.0) == 300


def test_generate_saves_pngs_with_reproducible_settings(engine):
    events = []
    request = GenerationRequest(prompt="a red fox", seed=11, batch_count=2, batch_size=2, preview_every=1, **SMALL)
    result = engine.generate(request, on_progress=events.append)
    assert [s.seed for s in result.settings] == [11, 12, 13, 14]
    assert [e.step for e in events] == [1, 2, 3, 4] and events[-1].total_steps == 4
    assert events[0].preview is not None and events[1].preview is None  # none on a batch's last step
    for path, settings in zip(result.paths, result.settings, strict=True):
        assert path.parent == (engine.config.output_dir / "images").resolve()
        saved = read_settings(path)
        assert saved == settings
        assert (saved.variant, saved.num_inference_steps, saved.guidance_scale) == ("Lens-Turbo", 2, 1.0)
    # Image k of a batch equals a single image generated with its seed (up to batched-matmul rounding).
    again = engine.generate(GenerationRequest(prompt="a red fox", seed=13, **SMALL))
    difference = np.abs(np.asarray(Image.open(again.paths[0]), np.int16) - np.asarray(Image.open(result.paths[2])))
    other = np.abs(np.asarray(Image.open(again.paths[0]), np.int16) - np.asarray(Image.open(result.paths[3])))
    assert difference.max() <= 2 < other.max()


def test_random_seed_is_drawn_and_recorded(engine):
    result = engine.generate(GenerationRequest(prompt="a fox in snow", original_prompt="fox", **SMALL))
    assert read_settings(result.paths[0]).seed == result.seed
    assert read_settings(result.paths[0]).original_prompt == "fox"


def test_cancel_stops_the_job_at_the_next_step_and_saves_nothing(engine):
    cancel = threading.Event()
    before = set((engine.config.output_dir / "images").glob("*.png"))
    steps_seen = []

    def on_progress(event):
        steps_seen.append(event.step)
        cancel.set()

    request = GenerationRequest(prompt="a fox", batch_count=3, **{**SMALL, "num_inference_steps": 4})
    with pytest.raises(GenerationCancelled):
        engine.generate(request, on_progress=on_progress, cancel_event=cancel)
    assert steps_seen == [1]
    assert set((engine.config.output_dir / "images").glob("*.png")) == before


def test_cancel_of_one_job_leaves_another_running(engine):
    mine, theirs = threading.Event(), threading.Event()
    results, errors = {}, {}

    def run(name, event, cancel_after_first_step):
        def on_progress(_):
            if cancel_after_first_step:
                event.set()

        try:
            results[name] = engine.generate(GenerationRequest(prompt=name, **SMALL), on_progress, event)
        except GenerationCancelled as error:
            errors[name] = error

    threads = [
        threading.Thread(target=run, args=("mine", mine, True)),
        threading.Thread(target=run, args=("theirs", theirs, False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(errors) == {"mine"} and set(results) == {"theirs"}
    assert read_settings(results["theirs"].paths[0]).prompt == "theirs"


def test_variant_switch_on_a_folder_changes_presets_only(engine):
    result = engine.generate(
        GenerationRequest(prompt="a fox", variant="Lens", width=64, height=64, num_inference_steps=1)
    )
    assert (result.settings[0].variant, result.settings[0].guidance_scale) == ("Lens", 5.0)
    engine.set_variant("Lens-Turbo")
    assert engine.variant.name == "Lens-Turbo"


def _random_lora(transformer, seed: int = 1) -> LensLora:
    """A rank-4 LoRA on two attention projections of the tiny denoiser, strong enough to change the image."""
    modules = ["transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.attn.to_out.0"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        linear = transformer.get_submodule(name)
        tensors[name] = {
            "lora_A.weight": torch.randn(4, linear.in_features, generator=generator) * 0.5,
            "lora_B.weight": torch.randn(linear.out_features, 4, generator=generator) * 0.5,
        }
    return LensLora("ink", tensors, dict.fromkeys(modules, 4), dict.fromkeys(modules, 4.0), {"lens.base_model": "tiny"})


def test_loras_are_listed_by_name_and_unknown_names_rejected(engine, tmp_path):
    lora = _random_lora(engine.pipe.transformer)
    save_lora(lora, tmp_path / "loras" / "style" / "ink.safetensors", "comfyui")  # a drop-in file, any format
    save_lora(lora, tmp_path / "training" / "run1" / "lora" / "run1.safetensors")  # what training writes
    save_lora(lora, tmp_path / "training" / "run1" / "lora" / "kohya" / "run1_kohya.safetensors", "kohya")  # an export
    (tmp_path / "training" / "run1" / "notes.txt").write_text("x")
    assert sorted(list_loras(tmp_path)) == ["loras/style/ink.safetensors", "training/run1/lora/run1.safetensors"]
    with pytest.raises(ValueError, match="Unknown LoRA '../secret.safetensors'"):
        engine.set_loras([("../secret.safetensors", 1.0)])


def test_a_lora_changes_the_image_and_removing_it_restores_the_base(engine):
    save_lora(_random_lora(engine.pipe.transformer), engine.config.output_dir / "loras" / "ink.safetensors")
    request = {"prompt": "a fox", "seed": 3, **SMALL}
    base = np.asarray(Image.open(engine.generate(GenerationRequest(**request)).paths[0]), dtype=int)
    styled = engine.generate(GenerationRequest(**request, loras=[("loras/ink.safetensors", 1.0)]))
    assert styled.settings[0].loras == [{"name": "loras/ink.safetensors", "weight": 1.0}]
    assert np.abs(np.asarray(Image.open(styled.paths[0]), dtype=int) - base).max() > 10
    # The Train tab hands over a path; it is accepted when it is one of the offered files.
    engine.set_loras([(str(engine.config.output_dir / "loras" / "ink.safetensors"), 0.5)])
    assert engine.loras == [("loras/ink.safetensors", 0.5)]
    # A request that names no LoRAs keeps the active set (it stays until the user changes it)...
    kept = engine.generate(GenerationRequest(**request))
    assert kept.settings[0].loras == [{"name": "loras/ink.safetensors", "weight": 0.5}]
    assert np.abs(np.asarray(Image.open(kept.paths[0]), dtype=int) - base).max() > 1
    # ...and an empty list removes them all: the base model again.
    again = engine.generate(GenerationRequest(**request, loras=[]))
    assert engine.loras == [] and again.settings[0].loras == []
    assert np.abs(np.asarray(Image.open(again.paths[0]), dtype=int) - base).max() <= 1


def test_each_workspace_keeps_its_own_active_loras(engine):
    """On a shared server one engine serves every visitor: the set one workspace activates (e.g. from its Train tab)
    is what *its* requests without a LoRA list use, never another's."""
    save_lora(_random_lora(engine.pipe.transformer, seed=2), engine.config.output_dir / "loras" / "ink.safetensors")
    alice, bob = engine.config.output_dir / "users" / "alice", engine.config.output_dir / "users" / "bob"
    for workspace in (alice, bob):
        workspace.mkdir(parents=True, exist_ok=True)
    engine.set_loras([("loras/ink.safetensors", 0.7)], alice)
    request = {"prompt": "a fox", "seed": 3, **SMALL}
    for_bob = engine.generate(GenerationRequest(**request), workspace=bob)
    for_alice = engine.generate(GenerationRequest(**request), workspace=alice)
    assert for_bob.settings[0].loras == [] and engine.active_loras(bob) == []
    assert for_alice.settings[0].loras == [{"name": "loras/ink.safetensors", "weight": 0.7}]
    assert engine.active_loras(alice) == [("loras/ink.safetensors", 0.7)]
    assert for_bob.paths[0].is_relative_to(bob) and for_alice.paths[0].is_relative_to(alice)


def test_a_bad_lora_is_named_as_its_caller_names_it_and_the_engine_keeps_serving(engine):
    """A LoRA that cannot be loaded is reported by its name in the caller's list, never by the server path, and
    leaves no half-loaded adapter behind."""
    from safetensors.torch import save_file

    bad = engine.config.output_dir / "loras" / "empty.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    save_file({}, bad)
    try:
        with pytest.raises(
            ValueError, match="The LoRA 'loras/empty.safetensors' could not be loaded: .*no tensors"
        ) as raised:
            engine.set_loras([("loras/empty.safetensors", 1.0)])
        assert str(engine.config.output_dir) not in str(raised.value) and engine.loras == []
        result = engine.generate(GenerationRequest(prompt="a fox", seed=1, loras=[], **SMALL))
        assert result.settings[0].loras == []
    finally:
        bad.unlink()


def test_a_missing_model_leaves_the_engine_serving_with_an_explanation(tmp_path):
    engine = LensEngine(
        EngineConfig(output_dir=tmp_path, model=str(tmp_path / "no-such-folder"), local_files_only=True)
    )
    engine.load_in_background().join(30)
    assert engine.status == "error"
    assert "no-such-folder" in engine.status_text() and "--model" in engine.status_text()
    assert "downloads microsoft/Lens-Turbo" in engine.status_text()  # a folder is not a Hub id to download
    with pytest.raises(EngineNotReady, match="No model loaded"):
        engine.generate(GenerationRequest(prompt="a fox", **SMALL))


def test_an_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    engine = LensEngine(EngineConfig(output_dir=tmp_path, model="microsoft/Lens-Turbo"))
    with pytest.raises(ValueError, match="Could not get microsoft/Lens-Turbo"):
        engine.load()
    assert engine.status == "error" and "YuCollection/Lens-Turbo-Diffusers" in engine.status_text()


def test_memory_mode_errors_are_clear(engine):
    with pytest.raises(ValueError, match="Unknown memory mode"):
        engine.set_memory_mode("huge")
    assert engine.set_memory_mode("full") == "full"


def test_output_dir_is_created_on_first_save(tiny_checkpoint, tmp_path):
    engine = LensEngine(EngineConfig(output_dir=tmp_path / "new" / "dir", model=str(tiny_checkpoint)))
    engine.load()
    result = engine.generate(GenerationRequest(prompt="a fox", seed=0, **SMALL))
    assert result.paths[0].is_file() and Path(result.paths[0]).name.endswith("-0-a-fox.png")


def test_a_lora_written_again_is_loaded_again(engine):
    """Training a run again under the same name rewrites its file: the next request must use the new weights."""
    path = engine.config.output_dir / "loras" / "again.safetensors"
    request = {"prompt": "a fox", "seed": 3, **SMALL, "loras": [("loras/again.safetensors", 1.0)]}
    save_lora(_random_lora(engine.pipe.transformer, seed=5), path)
    first = np.asarray(Image.open(engine.generate(GenerationRequest(**request)).paths[0]), dtype=int)
    save_lora(_random_lora(engine.pipe.transformer, seed=6), path)
    os.utime(
        path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000)
    )  # a later write, whatever the clock
    second = np.asarray(Image.open(engine.generate(GenerationRequest(**request)).paths[0]), dtype=int)
    assert np.abs(second - first).max() > 1


def test_a_model_is_named_without_the_server_folder_it_lives_in(tiny_checkpoint, tmp_path):
    """Banner and PNG settings name a local model by its folder's own name (a hosted app never shows server paths);
    Hub ids and "tiny" are kept whole, and a failed load told to visitors names no file."""
    from lens_core.engine import public_model_name
    from lens_core.metadata import read_settings

    assert public_model_name("microsoft/Lens-Turbo") == "microsoft/Lens-Turbo"
    assert public_model_name("tiny") == "tiny"
    assert public_model_name("/srv/weights/lens.safetensors") == "lens.safetensors"
    assert public_model_name(str(tiny_checkpoint)) == tiny_checkpoint.name

    engine = LensEngine(EngineConfig(output_dir=tmp_path / "out", model=str(tiny_checkpoint)))
    engine.load()
    assert str(tiny_checkpoint.parent) not in engine.status_text() and tiny_checkpoint.name in engine.status_text()
    result = engine.generate(GenerationRequest(prompt="a fox", seed=0, **SMALL))
    assert read_settings(result.paths[0]).model == tiny_checkpoint.name

    missing = LensEngine(
        EngineConfig(output_dir=tmp_path, model=str(tmp_path / "private" / "x"), local_files_only=True)
    )
    missing.load_in_background().join(30)
    assert str(tmp_path) in missing.status_text()  # the person at the machine gets the whole story
    visitors = missing.status_text(for_visitors=True)
    assert "No model loaded" in visitors and str(tmp_path) not in visitors and "private" not in visitors
