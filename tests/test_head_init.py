"""Specification of dualencoder/head_init.py: projection heads that start at the linear CCA map."""

import pytest
import torch
from dualencoder.cca import fit_cca, project
from dualencoder.head_init import cca_initialise_heads, cca_options, set_mlp_to_linear_map
from modeling_dualencoder import DualEncoderModel, ProjectionHead
from tests.tiny import tiny_timm_config


def correlated_features(n=400, image_dim=24, text_dim=32, shared=6, seed=0):
    """Paired features that share a few latent factors, with non-zero means (as pooled CNN features have)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, shared, generator=generator)
    images = latent @ torch.randn(shared, image_dim, generator=generator) + 0.5 * torch.randn(n, image_dim, generator=generator) + 3.0
    texts = latent @ torch.randn(shared, text_dim, generator=generator) + 0.5 * torch.randn(n, text_dim, generator=generator) - 1.0
    return images, texts


def test_an_mlp_head_can_compute_any_affine_map_exactly_through_its_gelu():
    torch.manual_seed(0)
    head = ProjectionHead(10, 6, kind="mlp", hidden_dim=12, dropout=0.1).eval()
    weight, bias = torch.randn(4, 10), torch.randn(4)
    set_mlp_to_linear_map(head, weight, bias)
    x = 5 * torch.randn(50, 10)  # far into GELU's curved part: the identity gelu(z) - gelu(-z) = z is exact
    out = head(x)
    torch.testing.assert_close(out[:, :4], x @ weight.T + bias, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[:, 4:], torch.zeros(50, 2))  # outputs beyond the map start at zero
    # the hidden units the map does not use keep their random first layer, so they can grow from zero
    first, last = head.net[0], head.net[3]
    assert first.weight[8:].abs().sum() > 0 and torch.equal(last.weight[:, 8:], torch.zeros(6, 4))


def test_a_head_without_room_or_without_a_bias_is_refused_with_the_option_to_change():
    with pytest.raises(ValueError, match="projection_head: mlp"):
        set_mlp_to_linear_map(ProjectionHead(10, 6, kind="linear"), torch.randn(4, 10), torch.randn(4))
    with pytest.raises(ValueError, match="projection_hidden_dim >= 8"):
        set_mlp_to_linear_map(ProjectionHead(10, 6, kind="mlp", hidden_dim=6), torch.randn(4, 10), torch.randn(4))
    with pytest.raises(ValueError, match="unknown key"):
        cca_options({"rdige": 1.0})


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_cca_initialised_heads_embed_exactly_as_the_linear_cca_baseline(power):
    torch.manual_seed(0)
    model = DualEncoderModel(tiny_timm_config(projection_dim=16, projection_hidden_dim=32)).eval()
    image_dim = model.visual_projection.net[0].in_features
    images, texts = correlated_features(image_dim=image_dim, text_dim=model.text_projection.net[0].in_features)
    fitted = cca_initialise_heads(model, images, texts, {"ridge": 1.0, "dims": 8, "power": power})
    assert fitted["dims"] == 8 and fitted["pairs"] == 400 and fitted["top_correlations"][0] > 0.9
    held_out_images, held_out_texts = correlated_features(n=50, image_dim=image_dim,
                                                          text_dim=model.text_projection.net[0].in_features, seed=1)
    expected_images, expected_texts = project(fit_cca(images, texts, 1.0), held_out_images, held_out_texts, 8, power)
    with torch.no_grad():
        got_images = model.project_image(held_out_images)
        got_texts = model.project_text(held_out_texts)
    torch.testing.assert_close(got_images[:, :8], expected_images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_texts[:, :8], expected_texts, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_images[:, 8:], torch.zeros(50, 8))


def test_more_cca_directions_than_the_head_can_hold_is_an_error_naming_the_limit():
    model = DualEncoderModel(tiny_timm_config(projection_dim=16, projection_hidden_dim=16))
    images, texts = correlated_features(image_dim=model.visual_projection.net[0].in_features,
                                        text_dim=model.text_projection.net[0].in_features)
    before = {k: v.clone() for k, v in model.state_dict().items() if "projection" in k}
    with pytest.raises(ValueError, match="visual_projection's hidden width / 2 = 8"):
        cca_initialise_heads(model, images, texts, {"dims": 12})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # refused before touching a head

    # the text head alone too narrow: still nothing changes (the vision head used to be written first)
    text_head = model.text_projection.net
    model.text_projection.net = torch.nn.Sequential(torch.nn.Linear(text_head[0].in_features, 8), text_head[1],
                                                    text_head[2], torch.nn.Linear(8, 16))
    before = {k: v.clone() for k, v in model.state_dict().items() if "projection" in k}
    with pytest.raises(ValueError, match="text_projection's hidden width / 2 = 4"):
        cca_initialise_heads(model, images, texts, {"dims": 6})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    linear = DualEncoderModel(tiny_timm_config(projection_head="linear"))
    images, texts = correlated_features(image_dim=linear.visual_projection.net.in_features,
                                        text_dim=linear.text_projection.net.in_features)
    with pytest.raises(ValueError, match="single linear layer.*projection_head: mlp"):
        cca_initialise_heads(linear, images, texts, {"dims": 4})
