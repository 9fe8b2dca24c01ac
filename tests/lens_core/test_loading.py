"""Loading the official layout: local folders, Hub ids with mirrors (offline, from the cache), single files, bad input."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from lens_core import CheckpointError, LensPipeline
from lens_core.loading import load_transformer_single_file


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_checkpoint):
    """An offline Hugging Face cache that holds only the Lens-Turbo *mirror*, as after a download."""
    cache = tmp_path / "hub"
    repo = cache / "models--YuCollection--Lens-Turbo-Diffusers"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_falls_back_to_a_mirror_and_applies_the_variant(hub_cache, caplog):
    pipe = LensPipeline.from_pretrained("microsoft/Lens-Turbo", local_files_only=True)
    assert pipe.variant_preset.name == "Lens-Turbo"
    assert "using the mirror YuCollection/Lens-Turbo-Diffusers" in caplog.text
    image = pipe("a fox", height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_unknown_hub_id_lists_what_was_tried(hub_cache):
    with pytest.raises(CheckpointError, match="Could not get someone/NotLens"):
        LensPipeline.from_pretrained("someone/NotLens", local_files_only=True)


def test_float32_weights_are_cast_to_the_requested_dtype(tiny_checkpoint):
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.bfloat16)
    assert pipe.transformer.img_in.weight.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    image = pipe("a fox", height=32, width=32, num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(image).all()


def test_comfy_single_file_denoiser(tmp_path, tiny_checkpoint, tiny_pipe):
    state = {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in tiny_pipe.transformer.state_dict().items()}
    single = tmp_path / "lens_turbo_bf16.safetensors"
    save_file(state, str(single))
    folder = tmp_path / "no-transformer"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors*"))  # keep configs
    for name in ("text_encoder", "vae"):
        shutil.rmtree(folder / name)
        shutil.copytree(tiny_checkpoint / name, folder / name)
    pipe = LensPipeline.from_pretrained(folder, transformer_file=single, torch_dtype=torch.float32)
    assert pipe.variant_preset.name == "Lens-Turbo"
    for name, tensor in tiny_pipe.transformer.state_dict().items():
        torch.testing.assert_close(pipe.transformer.state_dict()[name], tensor.to(torch.bfloat16).float())


def test_single_file_with_foreign_or_missing_tensors_is_refused(tmp_path, tiny_pipe):
    config = dict(tiny_pipe.transformer.config)
    foreign = tmp_path / "sdxl.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a Lens denoiser tensor"):
        load_transformer_single_file(foreign, config)
    partial = tmp_path / "partial.safetensors"
    save_file({"img_in.weight": tiny_pipe.transformer.img_in.weight.detach().clone()}, str(partial))
    with pytest.raises(CheckpointError, match="missing"):
        load_transformer_single_file(partial, config)


def _copy(tiny_checkpoint, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def test_folder_that_is_not_a_lens_checkpoint(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        LensPipeline.from_pretrained(tmp_path)
    folder = _copy(tiny_checkpoint, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="expected 'LensPipeline'"):
        LensPipeline.from_pretrained(folder)


def test_missing_component_and_corrupt_weights(tmp_path, tiny_checkpoint):
    folder = _copy(tiny_checkpoint, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="missing the vae/ component"):
        LensPipeline.from_pretrained(folder)
    shutil.copytree(tiny_checkpoint / "vae", folder / "vae")
    shard = sorted((folder / "text_encoder").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated download
    with pytest.raises(CheckpointError, match="text_encoder"):
        LensPipeline.from_pretrained(folder)


def test_neither_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub repo id"):
        LensPipeline.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_tiny_is_a_model_name_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    pipe = LensPipeline.from_pretrained("tiny")
    assert pipe.variant_preset.name == "Lens-Turbo"
    assert pipe.checkpoint_folder.parent == tmp_path / "cache"
    assert LensPipeline.from_pretrained("tiny").checkpoint_folder == pipe.checkpoint_folder  # built once
