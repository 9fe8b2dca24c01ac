"""Lens as a diffusers / transformers citizen, in the style of diffusers' ModelTesterMixin and PipelineTesterMixin
(written for Lens): save/load round trips, dtype dicts, attention backends, callback inputs, encode_prompt on its own,
the standard loading keywords, and models with other channel counts (pipeline, app engine, trainer)."""

from __future__ import annotations

import json
import logging

import lens_reference as ref
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from safetensors import safe_open

from lens_core import LensPipeline
from lens_core.latents import LatentLayout, pack_latents, unpack_latents
from lens_core.text_encoder import LensGptOssEncoder, dequantize_mxfp4, quantize_mxfp4
from lens_core.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_checkpoint
from lens_core.transformer_lens import (
    LensAttnProcessor,
    LensTransformer2DModel,
    apply_rope,
    lens_rope_positions,
    rope_frequencies,
    rope_tables,
)

SMALL = dict(height=32, width=32, num_inference_steps=2)


def _tiny_model(seed=0, **config) -> LensTransformer2DModel:
    torch.manual_seed(seed)
    model = LensTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **config}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def _inputs(model, batch=2, h=3, w=2, s_txt=6, padded=True):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(batch, h * w, model.config.in_channels, generator=g)
    text = [torch.randn(batch, s_txt, model.config.enc_hidden_dim, generator=g) * 3 for _ in range(4)]
    mask = torch.ones(batch, s_txt, dtype=torch.bool)
    if padded:
        mask[-1, s_txt - 2 :] = False
    return tokens, text, mask, torch.linspace(0.8, 0.2, batch), (1, h, w)


@pytest.fixture()
def restore_attention_backend():
    """set_attention_backend also sets diffusers' process-wide active backend; put it back for the other tests."""
    previous = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = previous


# ----------------------------------------------------------------------------------------------------------------
# The denoiser
# ----------------------------------------------------------------------------------------------------------------


def test_mask_defaults_to_every_text_token_valid():
    model = _tiny_model()
    tokens, text, _, timestep, grid = _inputs(model, padded=False)
    with torch.no_grad():
        without = model(tokens, text, timestep=timestep, img_shapes=grid).sample
        all_true = model(tokens, text, torch.ones(2, 6, dtype=torch.bool), timestep, grid).sample
    torch.testing.assert_close(without, all_true, rtol=0, atol=0)
    with pytest.raises(ValueError, match="timestep is required"):
        model(tokens, text, img_shapes=grid)


class _DirectSdpaProcessor(LensAttnProcessor):
    """What the attention did before the dispatcher: one F.scaled_dot_product_attention call with an additive mask."""

    def _attend(self, query, key, value, key_valid):
        mask = None
        if key_valid is not None:
            mask = torch.zeros(key_valid.shape, dtype=query.dtype).masked_fill(~key_valid, float("-inf"))[:, None, None]
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask)
        return out.transpose(1, 2)


def test_default_attention_backend_is_numerically_unchanged():
    model = _tiny_model()
    tokens, text, mask, timestep, grid = _inputs(model)
    assert set(model.attn_processors) == {"transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"}
    assert all(type(p) is LensAttnProcessor for p in model.attn_processors.values())
    with torch.no_grad():
        dispatched = model(tokens, text, mask, timestep, grid).sample
        model.set_attn_processor(_DirectSdpaProcessor())
        direct = model(tokens, text, mask, timestep, grid).sample
    assert torch.equal(dispatched, direct)


@pytest.mark.parametrize("backend", ["_native_math", "_native_flash"])
def test_attention_backend_switch(restore_attention_backend, backend):
    """`_native_math` takes the key mask; `_native_flash` takes none, so padded samples run one by one over their
    valid keys. Both give the native result; reset returns to the default."""
    model = _tiny_model()
    tokens, text, mask, timestep, grid = _inputs(model)
    with torch.no_grad():
        native = model(tokens, text, mask, timestep, grid).sample
        model.set_attention_backend(backend)
        assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName(backend)}
        switched = model(tokens, text, mask, timestep, grid).sample
        model.reset_attention_backend()
        assert {p._attention_backend for p in model.attn_processors.values()} == {None}
    torch.testing.assert_close(switched, native, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be one of the following"):
        model.set_attention_backend("no-such-kernel")


def test_rope_formulations_equal_the_spec_rotation():
    """The complex multiply (eager), the cos/sin formulation (torch.compile) and the spec's complex rotation agree."""
    image_positions, _ = lens_rope_positions(6, 5, 0)
    angles = rope_frequencies(image_positions, (8, 28, 28))  # [30, 32]
    x = torch.randn(2, 30, 3, 64, generator=torch.Generator().manual_seed(0))
    expected = ref.apply_rope(x, ref.rope_complex(image_positions, (8, 28, 28)))
    tables = rope_tables(angles)
    eager = apply_rope(x, tables)
    compiled = torch.compile(apply_rope, backend="aot_eager", fullgraph=True)(x, tables)
    # Before: real and imaginary parts rotated separately.
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    before = torch.stack([real * cos - imag * sin, real * sin + imag * cos], -1).flatten(-2)
    for result in (eager, compiled, before):
        torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eager, before, rtol=1e-6, atol=1e-6)
    assert eager.dtype == x.dtype and apply_rope(x.bfloat16(), tables).dtype == torch.bfloat16


def test_model_save_load_round_trip_and_dtype(tmp_path):
    model = _tiny_model()
    tokens, text, mask, timestep, grid = _inputs(model)
    model.save_pretrained(tmp_path / "transformer")
    loaded = LensTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    bf16 = LensTransformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(
            model(tokens, text, mask, timestep, grid).sample, loaded(tokens, text, mask, timestep, grid).sample
        )
        out = bf16(tokens, text, mask, timestep, grid).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize(("latent_channels", "patch"), [(4, 2), (16, 2), (4, 4)])
def test_packing_follows_the_layout(latent_channels, patch):
    latents = torch.randn(2, latent_channels, 3 * patch, 2 * patch)
    tokens = pack_latents(latents, patch)  # [2, 6, C * p * p]
    assert tokens.shape == (2, 6, latent_channels * patch * patch)
    c, p1, p2, y, x = latent_channels - 1, patch - 1, 0, 2, 1
    assert tokens[1, y * 2 + x, c * patch * patch + p1 * patch + p2] == latents[1, c, patch * y + p1, patch * x + p2]
    assert torch.equal(unpack_latents(tokens, 3, 2, patch), latents)


# ----------------------------------------------------------------------------------------------------------------
# The text encoder
# ----------------------------------------------------------------------------------------------------------------


def _small_gpt_oss_config(**changes):
    from transformers import GptOssConfig

    values = dict(
        num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, vocab_size=300, hidden_size=64,
        intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    return GptOssConfig(**{**values, **changes})


@pytest.mark.parametrize("mxfp4", [True, False])
def test_encoder_from_a_config_has_initialised_weights(mxfp4):
    encoder = LensGptOssEncoder(_small_gpt_oss_config(), selected_layers=(0, 2), mxfp4=mxfp4)
    experts = encoder.model.layers[1].mlp.experts
    if mxfp4:
        assert experts.gate_up_proj_blocks.dtype == torch.uint8
        dense = dequantize_mxfp4(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, torch.float32)
    else:
        dense = experts.gate_up_proj
    assert 0.01 < dense.std() < 0.03  # normal(0, initializer_range 0.02), not torch.empty garbage
    assert torch.equal(experts.gate_up_proj_bias, torch.zeros_like(experts.gate_up_proj_bias))
    for name, tensor in encoder.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
    layers = encoder(torch.randint(0, 300, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert [tuple(t.shape) for t in layers] == [(2, 7, 64)] * 2
    with pytest.raises(ValueError, match="selected layers"):
        LensGptOssEncoder(_small_gpt_oss_config())  # the real model's layers 5..23 do not exist in 3 layers


def test_mxfp4_quantization_round_trip():
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8)
    scales = torch.randint(118, 130, (3, 8, 2), dtype=torch.uint8)
    dense = dequantize_mxfp4(blocks, scales, torch.float32)  # [3, 64, 8]
    again = dequantize_mxfp4(*quantize_mxfp4(dense), torch.float32)
    assert torch.equal(again, dense)
    weights = torch.randn(64, 8)
    rounded = dequantize_mxfp4(*quantize_mxfp4(weights), torch.float32)
    assert (rounded - weights).abs().max() <= weights.abs().max() / 4  # FP4 keeps a 2-bit mantissa per block


def test_dense_experts_give_identical_features(tiny_checkpoint):
    encoder = LensGptOssEncoder.from_pretrained(tiny_checkpoint / "text_encoder", selected_layers=(0, 2, 3, 4),
                                                torch_dtype=torch.float32)  # fmt: skip
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_call = encoder(ids)
        added = encoder.keep_dequantized_experts()
        dense = encoder(ids)
    assert added > 0 and all(torch.equal(a, b) for a, b in zip(per_call, dense))
    assert not any("dense" in name for name in encoder.state_dict())  # never saved
    encoder.release_dequantized_experts()
    assert encoder.keep_dequantized_experts(max_bytes=1) == 0  # no room: stays per call


def test_memory_modes_keep_dense_experts_only_when_resident(tiny_checkpoint):
    from lens_core.memory import apply_memory_mode

    for mode, expected in (("full", True), ("low", False)):
        pipe = apply_memory_mode(LensPipeline.from_pretrained(tiny_checkpoint), mode, "cpu")
        assert (pipe.text_encoder.model.layers[0].mlp.experts.dense_gate_up is not None) is expected, mode


def test_encoder_from_pretrained_refuses_what_it_cannot_do(tiny_checkpoint):
    folder = tiny_checkpoint / "text_encoder"
    with pytest.raises(ValueError, match="max_memory: use memory_mode="):
        LensGptOssEncoder.from_pretrained(folder, max_memory={0: "1GB"})
    with pytest.raises(ValueError, match="split it, use a memory mode"):
        LensGptOssEncoder.from_pretrained(folder, device_map="auto")
    with pytest.raises(ValueError, match="safetensors files only"):
        LensGptOssEncoder.from_pretrained(folder, use_safetensors=False)
    with pytest.raises(ValueError, match="not a known keyword"):
        LensGptOssEncoder.from_pretrained(folder, frobnicate=True)
    encoder = LensGptOssEncoder.from_pretrained(
        folder, dtype=torch.float32, device_map={"": "cpu"}, low_cpu_mem_usage=True
    )
    assert encoder.selected_layers == (0, 2, 3, 4)  # read from config.lens_selected_layers
    assert encoder.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_encoder_without_a_source_saves_what_it_holds(tmp_path, caplog):
    encoder = LensGptOssEncoder(_small_gpt_oss_config(), selected_layers=(0, 1), mxfp4=True).eval()
    with caplog.at_level(logging.WARNING):
        encoder.save_pretrained(tmp_path)
    assert "never held" in caplog.text
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4" and config["lens_selected_layers"] == [0, 1]
    loaded = LensGptOssEncoder.from_pretrained(tmp_path, torch_dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(encoder.float()(ids), loaded(ids)))


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: saving and loading
# ----------------------------------------------------------------------------------------------------------------


OFFICIAL_INDEX = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LensGptOssEncoder"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "LensTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def _tensors(folder):
    names = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118
                names[name] = reader.get_slice(name).get_dtype()
    return names


def _latents(pipe, **kwargs):
    kwargs = {"prompt": "a red fox", "negative_prompt": "blurry", "guidance_scale": 4.0, **SMALL, **kwargs}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent").images


@pytest.fixture(scope="module")
def saved_pipeline(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "Lens-saved"
    tiny_pipe.save_pretrained(folder)
    return folder


def test_save_pretrained_writes_the_official_layout(saved_pipeline, tiny_checkpoint):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "LensPipeline"
    assert {name: index[name] for name in OFFICIAL_INDEX} == OFFICIAL_INDEX
    saved, source = _tensors(saved_pipeline / "text_encoder"), _tensors(tiny_checkpoint / "text_encoder")
    assert set(saved) == set(source)  # the full GPT-OSS again: later layer, final norm and lm_head copied over
    blocks = [name for name in saved if name.endswith("_blocks")]
    assert blocks and all(saved[name] == "U8" for name in blocks)  # MXFP4 bytes, never a dense copy
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in saved)
    config = json.loads((saved_pipeline / "text_encoder" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert (saved_pipeline / "text_encoder" / "generation_config.json").is_file()
    assert not list(saved_pipeline.parent.glob(".Lens-saved.*"))  # the staging folder is gone


def test_save_load_round_trip_gives_identical_outputs(tiny_pipe, saved_pipeline):
    reloaded = LensPipeline.from_pretrained(saved_pipeline, torch_dtype=torch.float32)
    assert torch.equal(_latents(reloaded), _latents(tiny_pipe))
    tiny_pipe.save_pretrained(saved_pipeline)  # saving over an existing folder replaces it whole
    assert torch.equal(_latents(LensPipeline.from_pretrained(saved_pipeline)), _latents(tiny_pipe))


@pytest.fixture()
def registered():
    """register_lens_classes() for one test, then the three names removed again."""
    import diffusers
    import transformers

    from lens_core.loading import register_lens_classes

    register_lens_classes()
    yield
    for module, name in ((diffusers, "LensPipeline"), (diffusers, "LensTransformer2DModel"),
                         (transformers, "LensGptOssEncoder")):  # fmt: skip
        module.__dict__.pop(name, None)


def test_diffusion_pipeline_loads_a_saved_folder_once_registered(registered, tiny_pipe, saved_pipeline):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(saved_pipeline, torch_dtype=torch.float32)
    assert type(pipe) is LensPipeline and type(pipe.text_encoder) is LensGptOssEncoder
    assert torch.equal(_latents(pipe), _latents(tiny_pipe))


def test_variant_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "v", variant="v1")
    assert (tmp_path / "v" / "text_encoder" / "model.v1.safetensors").is_file()  # one file under max_shard_size
    assert torch.equal(_latents(LensPipeline.from_pretrained(tmp_path / "v", variant="v1")), _latents(tiny_pipe))
    with pytest.raises(ValueError, match="no weights for variant='fp16'"):
        LensPipeline.from_pretrained(tmp_path / "v", variant="fp16")


def test_torch_dtype_dict_and_standard_keywords(tiny_checkpoint, tmp_path):
    pipe = LensPipeline.from_pretrained(
        tiny_checkpoint,
        torch_dtype={"transformer": torch.bfloat16, "default": torch.float32},
        revision="main",
        cache_dir=tmp_path,
        token=None,
        force_download=False,
        low_cpu_mem_usage=True,
        use_safetensors=True,
        device_map="cpu",
    )
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.isfinite(_latents(pipe)).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_map": "balanced"}, "choose a memory_mode"),
        ({"trust_remote_code": True}, "Lens runs no remote code"),
        ({"quantization_config": object()}, "quantize with memory_mode"),
        ({"use_safetensors": False}, "safetensors files only"),
        ({"torch_dtype": {"unet": torch.float16}}, "unknown components"),
        ({"device_map": "cpu", "memory_mode": "full"}, "cannot be combined"),
        ({"frobnicate": 1}, "frobnicate: unknown keyword"),
    ],
)
def test_unsupported_loading_keywords_are_refused(tiny_checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LensPipeline.from_pretrained(tiny_checkpoint, **kwargs)


def test_components_can_be_passed_in(tiny_checkpoint, tiny_pipe):
    transformer = _tiny_model(seed=5)
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, transformer=transformer)
    assert pipe.transformer is transformer
    assert not torch.equal(_latents(pipe), _latents(tiny_pipe))


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: calling conventions
# ----------------------------------------------------------------------------------------------------------------


def test_callback_on_step_end_tensor_inputs(tiny_pipe):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append(sorted(tensors))
        if step == 0:  # replacing the text features changes every later step
            return {"prompt_embeds": [t * 0 for t in tensors["prompt_embeds"]]}
        return {}

    inputs = ["latents", "prompt_embeds", "prompt_mask", "negative_prompt_embeds", "negative_prompt_mask"]
    changed = _latents(tiny_pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    assert seen == [sorted(inputs)] * 2
    assert not torch.equal(changed, _latents(tiny_pipe))
    with pytest.raises(ValueError, match=r"\['noise_pred'\] are not available"):
        _latents(tiny_pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_pipeline_callback_objects_name_their_inputs(tiny_pipe):
    from diffusers.callbacks import PipelineCallback

    class RecordMask(PipelineCallback):
        tensor_inputs = ["latents", "negative_prompt_mask"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.masks = getattr(self, "masks", []) + [callback_kwargs["negative_prompt_mask"]]
            return callback_kwargs

    recorder = RecordMask()
    _latents(tiny_pipe, negative_prompt="", callback_on_step_end=recorder)
    assert len(recorder.masks) == 2 and not recorder.masks[0].any()  # empty negative: no text keys


def test_encode_prompt_in_isolation(tiny_pipe):
    embeds, mask, negative, negative_mask = tiny_pipe.encode_prompt(["a fox", "two red cats"], " \n ", 2)
    assert len(embeds) == 4 and embeds[0].shape[0] == 4 and mask.dtype == torch.bool
    assert torch.equal(embeds[0][0], embeds[0][1]) and not torch.equal(embeds[0][1], embeds[0][2])  # p0, p0, p1, p1
    assert all(not t.any() for t in negative) and not negative_mask.any()  # whitespace negative = empty
    alone, _, none, none_mask = tiny_pipe.encode_prompt("a fox", do_classifier_free_guidance=False)
    assert none is None and none_mask is None
    torch.testing.assert_close(alone[0][0], embeds[0][0][: alone[0].shape[1]], rtol=1e-5, atol=1e-5)  # batch of one
    given = [t[:1] for t in embeds]
    again = tiny_pipe.encode_prompt(prompt_embeds=given, prompt_mask=mask[:1], negative_prompt_embeds=given)
    assert torch.equal(again[2][0], given[0]) and again[3].all()


def test_official_behaviour_switches(tiny_checkpoint):
    """prompt_truncation="text" cuts the whole rendered text (losing the template's end); strip_control_markers=False
    keeps markers in the prompt; keep_latents_float32=False keeps the latents in the model dtype."""
    pipe = LensPipeline.from_pretrained(tiny_checkpoint)
    long_prompt = "a red fox in tall grass " * 80
    ours = pipe.tokenize([long_prompt], 200)
    pipe.prompt_truncation = "text"
    upstream = pipe.tokenize([long_prompt], 200)
    suffix_ids = pipe.tokenizer("<|end|>", add_special_tokens=False)["input_ids"]
    assert ours.input_ids.shape[1] == upstream.input_ids.shape[1] == 200 and ours.truncated == upstream.truncated == [
        True
    ]
    assert ours.input_ids[0, -1] != upstream.input_ids[0, -1] and suffix_ids[0] in ours.input_ids[0, -40:].tolist()
    pipe.prompt_truncation = "prompt"
    marked = "a fox<|end|><|start|>system"
    stripped = pipe.tokenize([marked]).input_ids.shape[1]
    pipe.strip_control_markers = False
    assert pipe.tokenize([marked]).input_ids.shape[1] > stripped
    pipe.keep_latents_float32 = False
    pipe.transformer.to(torch.bfloat16)
    assert _latents(pipe).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Other channel counts: pipeline, app engine, trainer
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[(4, 2), (16, 2), (4, 4)], ids=["vae4-in16", "vae16-in64", "vae4-patch4-in64"])
def odd_checkpoint(request, tmp_path_factory):
    latent_channels, patch = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{latent_channels}-{patch}") / "Lens-tiny"
    return build_tiny_checkpoint(folder, seed=1, latent_channels=latent_channels, patch_size=patch)


def test_other_channel_counts_match_the_spec(odd_checkpoint):
    pipe = LensPipeline.from_pretrained(odd_checkpoint)
    layout = pipe.latent_layout
    assert (
        pipe.transformer.config.in_channels == layout.packed_channels == layout.latent_channels * layout.patch_size**2
    )
    size = 2 * pipe.pixels_per_token  # 2 x 2 tokens
    kwargs = dict(prompt="a red fox", negative_prompt="", height=size, width=size, num_inference_steps=2)
    latents = pipe(
        **kwargs, guidance_scale=4.0, generator=torch.Generator().manual_seed(2), output_type="latent"
    ).images
    image = pipe(**kwargs, guidance_scale=4.0, generator=torch.Generator().manual_seed(2), output_type="pt").images
    assert latents.shape == (1, 4, layout.packed_channels) and image.shape == (1, 3, size, size)
    from test_pipeline import _reference_images

    expected_latents, expected_image = _reference_images(pipe, "a red fox", "", 4.0, 2, 2, size, size)
    torch.testing.assert_close(latents, expected_latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image, expected_image, rtol=1e-4, atol=1e-5)


def test_mismatched_vae_and_denoiser_are_refused(odd_checkpoint, tiny_pipe):
    pipe = LensPipeline.from_pretrained(odd_checkpoint)
    with pytest.raises(ValueError, match="does not fit the VAE"):
        LensPipeline(pipe.scheduler, pipe.text_encoder, pipe.tokenizer, tiny_pipe.transformer, pipe.vae)
    with pytest.raises(ValueError, match="patch_size"):
        LatentLayout.from_vae(type("Vae", (), {"config": type("C", (), {"patch_size": (2, 4)})})())


def test_app_engine_runs_other_channel_counts(odd_checkpoint, tmp_path):
    from lens_core.engine import EngineConfig, GenerationRequest, LensEngine

    engine = LensEngine(EngineConfig(output_dir=tmp_path, model=str(odd_checkpoint), memory_mode="full"))
    engine.load(variant="Lens-Turbo")
    events = []
    request = GenerationRequest(prompt="a red fox", width=64, height=64, num_inference_steps=2, seed=1, preview_every=1)
    result = engine.generate(request, on_progress=events.append)
    assert len(result.paths) == 1 and result.paths[0].is_file()
    grid = 64 // engine.pipe.pixels_per_token
    assert events[0].preview is not None and events[0].preview.size[0] % grid == 0


def test_trainer_runs_other_channel_counts(odd_checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    from training.config import build_config
    from training.progress import read_progress
    from training.trainer import LensTrainer

    data = tmp_path / "data"
    data.mkdir()
    for index, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(f"a plain square of colour {index}")
    overrides = {
        "model.path": str(odd_checkpoint), "model.base_precision": "fp32", "data.path": str(data),
        "data.buckets": [[64, 64]], "data.caption_dropout": 0.0, "output_dir": str(tmp_path / "run"),
        "loop.max_steps": 2, "loop.gradient_checkpointing": False, "monitor.sample_size": [64, 64],
        "monitor.sample_steps": 2, "monitor.sample_every": 0, "monitor.tensorboard": False, "adapter.rank": 2,
    }  # fmt: skip
    LensTrainer(build_config({}, overrides)).run()
    losses = [event["loss"] for event in read_progress(tmp_path / "run") if event["event"] == "step"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
