"""Memory modes on the tiny model: every mode that exists on CPU runs and matches `full`; the rest say why not."""

from __future__ import annotations

import pytest
import torch

import lens_core
from lens_core import LensPipeline
from lens_core.memory import (
    MEMORY_MODES,
    SIZE_ORDER,
    LensOutOfMemoryError,
    PinnedOffload,
    apply_memory_mode,
    choose_memory_mode,
    next_smaller_mode,
    pick_memory_mode,
    run_with_oom_guard,
)

CPU_MODES = [name for name, mode in MEMORY_MODES.items() if not mode.needs_cuda]
CUDA_MODES = [name for name, mode in MEMORY_MODES.items() if mode.needs_cuda]


def _load(checkpoint):
    pipe = LensPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red fox",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=generator,
        output_type="pt",
    ).images


@pytest.fixture(scope="module")
def full_image(tiny_checkpoint):
    return _image(apply_memory_mode(_load(tiny_checkpoint), "full", "cpu"))


def test_public_api_is_exported():
    assert lens_core.MEMORY_MODES is MEMORY_MODES and lens_core.apply_memory_mode is apply_memory_mode
    for mode in MEMORY_MODES.values():
        assert mode.description and mode.target and 2 <= mode.card_gib <= 80
    assert set(SIZE_ORDER) <= set(MEMORY_MODES)


@pytest.mark.parametrize("mode", CPU_MODES)
def test_cpu_mode_runs_and_matches_full(tiny_checkpoint, full_image, mode):
    pipe = apply_memory_mode(_load(tiny_checkpoint), mode, "cpu")
    assert pipe.memory_mode == mode and pipe.lens_precision == MEMORY_MODES[mode].transformer_precision
    tile = MEMORY_MODES[mode].vae_tile_px
    assert pipe.vae.use_tiling == bool(tile) and (not tile or pipe.vae.tile_sample_min_size == tile)
    image = _image(pipe)
    assert image.shape == full_image.shape and torch.isfinite(image).all()
    if MEMORY_MODES[mode].transformer_precision == "none":  # placement alone never changes the numbers
        torch.testing.assert_close(image, full_image, rtol=1e-5, atol=1e-5)
    else:
        cosine = torch.nn.functional.cosine_similarity(image.flatten() - 0.5, full_image.flatten() - 0.5, dim=0)
        assert cosine >= 0.98


def test_streaming_moves_each_layer_in_and_out(tiny_checkpoint):
    """Count the per-layer onloads/offloads during one encode: one each per layer, then all back in CPU memory."""
    pipe = apply_memory_mode(_load(tiny_checkpoint), "low", "cpu")
    layers = pipe.text_encoder.model.layers
    events = []
    for layer in layers:
        hooks = list(layer._forward_pre_hooks.values())
        assert len(hooks) == 1  # the streaming hook
        layer.register_forward_pre_hook(lambda module, args: events.append("in"))
        layer.register_forward_hook(lambda module, args, output: events.append("out"))
    pipe.encode_prompt("a red fox", device="cpu", do_classifier_free_guidance=False)
    assert events == ["in", "out"] * len(layers)
    assert all(p.device.type == "cpu" for p in pipe.text_encoder.parameters())


def test_pinned_offload_round_trip():
    module = torch.nn.Linear(4, 3)
    offload = PinnedOffload(module, torch.device("cpu"))
    homes = [home for _tensor, home in offload.tensors]
    assert offload.num_bytes() == (4 * 3 + 3) * 4
    offload.onload()
    offload.offload()
    assert all(
        tensor.data.data_ptr() == home.data_ptr() for (tensor, _), home in zip(offload.tensors, homes, strict=True)
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_cuda_modes_raise_clearly_on_cpu(tiny_pipe, mode):
    with pytest.raises(ValueError, match=f"Memory mode '{mode}' needs a CUDA GPU.*use 'full'"):
        apply_memory_mode(tiny_pipe, mode, "cpu")


def test_bad_mode_auto_and_reapply(tiny_checkpoint, tiny_pipe):
    with pytest.raises(ValueError, match="Unknown memory mode 'huge'.*'auto'.*'minimal'"):
        apply_memory_mode(tiny_pipe, "huge", "cpu")
    pipe = apply_memory_mode(_load(tiny_checkpoint), "auto", "cpu")
    assert pipe.memory_mode == choose_memory_mode("cpu") == "full"
    with pytest.raises(ValueError, match="already in memory mode 'full'"):
        apply_memory_mode(pipe, "low", "cpu")


def test_precision_override(tiny_checkpoint):
    import bitsandbytes as bnb

    pipe = apply_memory_mode(_load(tiny_checkpoint), "minimal", "cpu", transformer_precision="int8")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.img_qkv, bnb.nn.Linear8bitLt)
    assert _image(pipe).shape == (1, 3, 32, 32)


def test_oom_guard_names_the_next_mode_and_the_pipeline_keeps_working(tiny_checkpoint):
    pipe = apply_memory_mode(_load(tiny_checkpoint), "full", "cpu")

    def run_out_of_memory():
        _held = torch.empty(1024, 1024)  # freed with the frame when the guard handles the error
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(LensOutOfMemoryError, match="memory mode 'balanced'") as caught:
        run_with_oom_guard(run_out_of_memory, "full")
    assert isinstance(caught.value, ValueError) and "Tried to allocate 2.00 GiB" in str(caught.value)
    with pytest.raises(LensOutOfMemoryError, match="smaller image size"):
        run_with_oom_guard(run_out_of_memory, "sequential")
    assert run_with_oom_guard(lambda: _image(pipe), "full").shape == (1, 3, 32, 32)
    assert [next_smaller_mode(name) for name in ("fast", "low", "offload", "sequential")] == [
        "balanced",
        "minimal",
        "sequential",
        None,
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MEMORY_MODES))
def test_every_mode_runs_on_cuda(tiny_checkpoint, mode):
    from lens_core.quantization import check_precision_available

    try:
        check_precision_available(MEMORY_MODES[mode].transformer_precision, "cuda")
    except ValueError as error:
        pytest.skip(str(error))
    reference = _image(apply_memory_mode(_load(tiny_checkpoint), "full", "cuda"))
    image = _image(apply_memory_mode(_load(tiny_checkpoint), mode, "cuda"))
    cosine = torch.nn.functional.cosine_similarity(image.flatten() - 0.5, reference.flatten() - 0.5, dim=0)
    assert cosine >= 0.98


def test_cli_memory_mode(tmp_path, monkeypatch):
    from lens_core.cli import main

    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    common = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a fox",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--seed",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*common, "--memory-mode", "minimal", "--out", str(tmp_path / "fox.png")]) == 0
    assert (tmp_path / "fox.png").is_file()
    assert main([*common, "--memory-mode", "sequential", "--out", str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()


def test_auto_picks_by_simulated_vram_and_ram():
    """`auto` walks SIZE_ORDER with the simulated needs (lens_core/memory_table.json): a card just big enough for a
    mode gets it, a little less gets the next one, and too little system RAM rules a mode out."""
    from lens_core.memory import mode_ram_need_gib, mode_vram_need_gib

    plenty = 512.0
    for larger in SIZE_ORDER[:-1]:
        need = mode_vram_need_gib(larger)
        assert pick_memory_mode(need, plenty) == larger
        assert pick_memory_mode(need - 0.01, plenty) != larger
    # Streaming keeps the encoder in (pinned) system RAM: with less RAM than that, only `full` remains, if it fits.
    tight_ram = mode_ram_need_gib("low") - 0.1
    assert mode_ram_need_gib("full") < tight_ram
    assert pick_memory_mode(plenty, tight_ram) == "full"
    with pytest.raises(ValueError, match="No memory mode fits .* GiB of usable GPU memory"):
        pick_memory_mode(mode_vram_need_gib("low"), tight_ram)
    with pytest.raises(ValueError, match="No memory mode fits .* GiB of usable GPU memory"):
        pick_memory_mode(0.5, plenty)


def test_offload_hook_runs_even_when_the_layer_fails(tiny_checkpoint):
    """An error inside a streamed layer (e.g. out of memory) must still send its weights back to CPU memory."""
    pipe = apply_memory_mode(_load(tiny_checkpoint), "low", "cpu")
    layer = pipe.text_encoder.model.layers[1]
    seen = []

    def fail(module, args):
        seen.append([offload.is_onloaded for offload in pipe.text_encoder.lens_offloads])
        raise torch.OutOfMemoryError("simulated")

    handle = layer.register_forward_pre_hook(fail)  # runs after the streaming hook has onloaded the layer
    with pytest.raises(LensOutOfMemoryError):
        run_with_oom_guard(lambda: pipe.encode_prompt("a fox", device="cpu", do_classifier_free_guidance=False), "low")
    handle.remove()
    assert seen == [[False, True, False, False, False]]  # layer 1 was on the device when it failed
    assert not any(offload.is_onloaded for offload in pipe.text_encoder.lens_offloads)  # and went back
    embeds, *_ = pipe.encode_prompt("a fox", device="cpu", do_classifier_free_guidance=False)
    assert torch.isfinite(embeds[0]).all()


def test_tiled_decode_runs_through_the_pipeline(tiny_checkpoint, full_image):
    """A 64x64 image decoded in 32 px tiles goes through the tiled path of our decode and comes out whole."""
    from lens_core.memory import _enable_vae_tiling

    pipe = _load(tiny_checkpoint)
    _enable_vae_tiling(pipe.vae, 32)
    assert pipe.vae.tile_latent_min_size == 4
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(prompt="a fox", height=64, width=64, num_inference_steps=2, guidance_scale=1.0, output_type="pt")
    tiled = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.vae.disable_tiling()
    whole = pipe(generator=generator, **kwargs).images
    assert tiled.shape == whole.shape == (1, 3, 64, 64) and not torch.equal(tiled, whole)
    # Not compared closer: the VAE's mid-block attention sees only its tile, so a random tiny VAE with 4-latent tiles
    # gives a visibly different picture; on the real VAE at 512 px tiles the difference is at the seams.
    assert torch.isfinite(tiled).all() and tiled.min() >= 0 and tiled.max() <= 1


def test_from_pretrained_takes_a_memory_mode(tiny_checkpoint):
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32, memory_mode="minimal", device="cpu")
    assert pipe.memory_mode == "minimal" and pipe.lens_precision == "nf4"
    with pytest.raises(ValueError, match="Unknown memory mode 'tiny'"):
        LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32, memory_mode="tiny")


def test_mode_table_for_the_readme_and_bad_combinations(tiny_pipe):
    from lens_core.memory import format_memory_mode_table

    table = format_memory_mode_table()
    assert all(f"| `{name}` | {mode.target} |" in table for name, mode in MEMORY_MODES.items())
    with pytest.raises(ValueError, match="precision 'nf4' is not supported there.*'minimal'"):
        apply_memory_mode(tiny_pipe, "sequential", "cpu", transformer_precision="nf4")
    with pytest.raises(ValueError, match="Unknown denoiser precision 'fp4'"):
        apply_memory_mode(tiny_pipe, "low", "cpu", transformer_precision="fp4")


def test_offload_hooks_move_the_denoisers_rope_tables():
    """A block's inputs include the RoPE tables (a NamedTuple): the offload hooks move its tensors and keep its type."""
    from lens_core.memory import _to_device
    from lens_core.transformer_lens import RopeTables

    tables = RopeTables(torch.ones(3, 2, dtype=torch.complex64), torch.ones(3, 4), torch.zeros(3, 4))
    moved = _to_device(((tables, torch.ones(2)), {"rope": tables}), torch.device("cpu"))
    assert isinstance(moved[0][0], RopeTables) and isinstance(moved[1]["rope"], RopeTables)
    assert torch.equal(moved[0][0].cos, tables.cos)
