"""LensTransformer2DModel: official names and shapes, and the forward pass against the plain spec re-implementation."""

from __future__ import annotations

import lens_reference as ref
import pytest
import torch

from lens_core.latents import pack_latents, unpack_latents
from lens_core.tiny import TINY_TRANSFORMER_CONFIG
from lens_core.transformer_lens import LensTransformer2DModel, lens_rope_positions


@pytest.fixture(scope="module")
def real_size_meta_model():
    with torch.device("meta"):
        return LensTransformer2DModel()


def test_real_config_state_dict_matches_the_official_names_and_shapes(real_size_meta_model):
    state = real_size_meta_model.state_dict()
    assert len(state) == 1264
    expected = {
        "img_in.weight": (1536, 128),
        "img_in.bias": (1536,),
        "txt_norm.3.weight": (2880,),
        "txt_in.weight": (1536, 11520),
        "time_text_embed.timestep_embedder.linear_1.weight": (1536, 256),
        "time_text_embed.timestep_embedder.linear_2.weight": (1536, 1536),
        "norm_out.linear.weight": (3072, 1536),
        "proj_out.weight": (128, 1536),
        "transformer_blocks.47.attn.img_qkv.weight": (4608, 1536),
        "transformer_blocks.47.attn.txt_qkv.bias": (4608,),
        "transformer_blocks.0.attn.norm_added_k.weight": (64,),
        "transformer_blocks.0.attn.to_out.0.weight": (1536, 1536),
        "transformer_blocks.0.attn.to_add_out.bias": (1536,),
        "transformer_blocks.0.img_mod.1.weight": (9216, 1536),
        "transformer_blocks.0.txt_mod.1.bias": (9216,),
        "transformer_blocks.0.txt_norm2.weight": (1536,),
        "transformer_blocks.0.img_mlp.w1.weight": (4096, 1536),
        "transformer_blocks.0.txt_mlp.w2.weight": (1536, 4096),
    }
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape, name
    assert "transformer_blocks.0.img_mlp.w1.bias" not in state
    assert len([name for name in state if name.startswith("transformer_blocks.7.")]) == 26
    parameters = sum(t.numel() for t in state.values())
    assert 4.09e9 < parameters < 4.11e9


def test_rope_positions_are_centred():
    image, text = lens_rope_positions(64, 64, 3)
    assert image[:, 1].min() == -32 and image[:, 1].max() == 31
    image, text = lens_rope_positions(5, 4, 2)
    assert sorted(set(image[:, 1].tolist())) == [-3, -2, -1, 0, 1]
    assert sorted(set(image[:, 2].tolist())) == [-2, -1, 0, 1]
    assert text.tolist() == [[2, 2, 2], [3, 3, 3]]  # max(5//2, 4//2) + j on all axes
    assert image[1].tolist() == [0, -3, -1]  # raster order: second token is row 0, column 1


def test_packing_puts_channel_c_patch_p1_p2_at_index_c4_p1_2_p2():
    latents = torch.randn(2, 32, 6, 4)
    tokens = pack_latents(latents, 2)  # [2, 3*2, 128]
    assert tokens.shape == (2, 6, 128)
    c, p1, p2, y, x = 5, 1, 0, 2, 1
    assert tokens[1, y * 2 + x, c * 4 + p1 * 2 + p2] == latents[1, c, 2 * y + p1, 2 * x + p2]
    assert torch.equal(unpack_latents(tokens, 3, 2, 2), latents)


def _random_inputs(model, batch, h, w, s_txt, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, h * w, 128, generator=g)
    text = [torch.randn(batch, s_txt, model.config.enc_hidden_dim, generator=g) * 3 for _ in range(4)]
    mask = torch.ones(batch, s_txt, dtype=torch.bool)
    mask[0, s_txt - 2 :] = False  # padded text keys must be ignored
    timestep = torch.tensor([0.7, 0.25][:batch])
    return tokens, text, mask, timestep


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = LensTransformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm would show
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.mark.parametrize("h,w", [(3, 2), (2, 5)])
def test_forward_matches_the_spec_reimplementation(h, w):
    model = _tiny_model()
    tokens, text, mask, timestep = _random_inputs(model, 2, h, w, 6)
    with torch.no_grad():
        ours = model(tokens, text, mask, timestep, img_shapes=[(1, h, w)] * 2).sample
    expected = ref.denoiser_forward(model.state_dict(), dict(model.config), tokens, text, mask, timestep, h, w)
    assert ours.shape == (2, h * w, 128)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_masked_text_tokens_do_not_change_the_image_output():
    model = _tiny_model()
    tokens, text, mask, timestep = _random_inputs(model, 1, 2, 2, 5)
    mask = torch.tensor([[True, True, True, False, False]])
    changed = [t.clone() for t in text]
    for t in changed:
        t[:, 3:] = 100.0
    with torch.no_grad():
        a = model(tokens, text, mask, timestep, (1, 2, 2)).sample
        b = model(tokens, changed, mask, timestep, (1, 2, 2)).sample
    torch.testing.assert_close(a, b)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = _tiny_model()
    tokens, text, mask, timestep = _random_inputs(model, 2, 2, 2, 4)

    def loss_and_grad():
        model.zero_grad()
        loss = model(tokens, text, mask, timestep, (1, 2, 2)).sample.square().mean()
        loss.backward()
        return loss.detach(), model.img_in.weight.grad.clone()

    plain = loss_and_grad()
    model.enable_gradient_checkpointing()
    checkpointed = loss_and_grad()
    torch.testing.assert_close(plain[0], checkpointed[0])
    torch.testing.assert_close(plain[1], checkpointed[1])


def test_bad_inputs_are_rejected_with_the_allowed_shape():
    model = _tiny_model()
    tokens, text, mask, timestep = _random_inputs(model, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="list of 4 tensors"):
        model(tokens, text[:3], mask, timestep, (1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B=1, S_txt, 64\]"):
        model(tokens, [t[..., :10] for t in text], mask, timestep, (1, 2, 2))
    with pytest.raises(ValueError, match="does not match 4 image tokens"):
        model(tokens, text, mask, timestep, (1, 3, 2))
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        model(tokens, text, mask[:, :2], timestep, (1, 2, 2))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        LensTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "axes_dims_rope": [4, 4, 4]})
