"""Gradient checkpointing and GradCache trade compute for memory; neither may change the loss or a gradient."""

import copy
import warnings

import pytest
import torch

from backbones_dualencoder import tower_blocks
from dualencoder.losses import build_loss
from dualencoder.training.grad_cache import dual_encoder_grad_cache_backward, grad_cache_backward, split_inputs
from dualencoder.training.step import batch_loss
from modeling_dualencoder import DualEncoderModel
from tests.tiny import tiny_batch, tiny_timm_config, tiny_vit_distilbert_config


def _with_dropout(config):
    """Dropout everywhere it can be (ViT's default is none; DistilBERT's is 0.1), so RNG replay matters."""
    config.vision_config.hidden_dropout_prob = 0.1
    config.vision_config.attention_probs_dropout_prob = 0.1
    return config


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = DualEncoderModel(config)
    model.train()
    return model


LOSS = build_loss("clip")  # the loss lives outside the model, as the training step applies it


def _loss_and_grads(model, batch, seed=1):
    torch.manual_seed(seed)
    loss = batch_loss(LOSS, model(**batch), batch.get("image_ids"))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(expected, actual, atol=1e-5):
    """Equal up to float32 rounding (chunked sums add in another order: about 3e-6 on gradients near 1)."""
    (loss_a, grads_a), (loss_b, grads_b) = expected, actual
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=atol)
    assert grads_b.keys() == grads_a.keys()
    assert len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=atol, msg=name)


def _count_calls(block):
    """Forward calls of the block's first sub-module (inside any checkpoint, whatever wraps the block itself)."""
    module = next(block.children())
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("config_fn", [lambda: _with_dropout(tiny_vit_distilbert_config(projection_head="mlp",
                                                                                        projection_dropout=0.1)),
                                       tiny_timm_config], ids=["vit-distilbert", "timm"])
def test_gradient_checkpointing_keeps_loss_and_gradients(config_fn):
    config = config_fn()
    plain = _model(config)
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():  # newer transformers call this an alias of activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_enable()
    batch = tiny_batch(config, 4)
    vision_calls = _count_calls(tower_blocks(checkpointed.vision_model)[0])
    text_calls = _count_calls(tower_blocks(checkpointed.text_model)[0])
    _assert_same(_loss_and_grads(plain, batch), _loss_and_grads(checkpointed, batch))
    # the first block of each tower ran again in the backward: its activations were not kept
    assert len(vision_calls) == 2 and len(text_calls) == 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_disable()
    vision_calls.clear(), text_calls.clear()
    _loss_and_grads(checkpointed, batch)
    assert len(vision_calls) == 1 and len(text_calls) == 1


def test_split_inputs():
    chunks = split_inputs({"a": torch.arange(5), "b": torch.arange(10).view(5, 2)}, 2)
    assert [c["a"].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert chunks[2]["b"].tolist() == [[8, 9]]
    with pytest.raises(ValueError):
        split_inputs({"a": torch.arange(5), "b": torch.arange(4)}, 2)
    with pytest.raises(ValueError):
        split_inputs({}, 2)


def test_grad_cache_needs_raw_inputs_of_both_towers():
    config = tiny_vit_distilbert_config()
    model = _model(config)
    batch = tiny_batch(config, 4)
    with pytest.raises(ValueError, match="pixel_values"):
        dual_encoder_grad_cache_backward(model, LOSS, {"vision_pooled": torch.randn(4, 32), "input_ids": batch["input_ids"]}, 2)


@pytest.mark.parametrize("image_ids", [None, [0, 0, 1, 2, 3, 3, 4]], ids=["distinct", "shared-images"])
def test_grad_cache_matches_one_unchunked_backward(image_ids):
    """No dropout: chunking changes nothing, so GradCache equals the plain forward's loss.backward()
    (with `image_ids`, rows of one image are positives of each other in both)."""
    config = tiny_vit_distilbert_config()
    config.text_config.dropout = config.text_config.attention_dropout = 0.0
    model = _model(config)
    cached = copy.deepcopy(model)
    batch = tiny_batch(config, 7)
    if image_ids is not None:
        batch["image_ids"] = torch.tensor(image_ids)
    expected = _loss_and_grads(model, batch)
    torch.manual_seed(1)
    loss = dual_encoder_grad_cache_backward(cached, LOSS, batch, chunk_size=3)  # chunks of 3, 3, 1
    actual = (loss, {name: p.grad.clone() for name, p in cached.named_parameters() if p.grad is not None})
    _assert_same(expected, actual)
    assert cached.logit_scale.grad is not None and cached.logit_scale.grad.abs() > 0  # the temperature learns


def test_grad_cache_replays_dropout():
    """Dropout on: GradCache equals one backward through the same chunked forward (same masks, drawn once)."""
    config = _with_dropout(tiny_vit_distilbert_config(projection_head="mlp", projection_dropout=0.1))
    model = _model(config)
    cached = copy.deepcopy(model)
    batch = tiny_batch(config, 6)
    images, texts = {"pixel_values": batch["pixel_values"]}, {k: batch[k] for k in ("input_ids", "attention_mask")}

    def loss_fn(net):
        return lambda i, t: LOSS(i, t, net.get_logit_scale())

    torch.manual_seed(1)  # the reference: the chunked forward with a graph, then one backward
    image_embeds = torch.cat([model.get_image_features(**c) for c in split_inputs(images, 4)])
    text_embeds = torch.cat([model.get_text_features(**c) for c in split_inputs(texts, 4)])
    loss = loss_fn(model)(image_embeds, text_embeds)
    loss.backward()
    after_reference = torch.rand(1)
    expected = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    torch.manual_seed(1)
    loss = grad_cache_backward(lambda c: cached.get_image_features(**c), lambda c: cached.get_text_features(**c),
                               loss_fn(cached), images, texts, chunk_size=4)
    assert torch.equal(torch.rand(1), after_reference)  # the caller's generator moved as for one forward
    _assert_same(expected, (loss, {n: p.grad.clone() for n, p in cached.named_parameters() if p.grad is not None}))

    torch.manual_seed(2)  # another seed draws other masks: the replay is what makes them agree
    other = grad_cache_backward(lambda c: cached.get_image_features(**c), lambda c: cached.get_text_features(**c),
                                loss_fn(cached), images, texts, chunk_size=4)
    assert not torch.equal(other, loss)


def test_grad_cache_accumulates_like_backward():
    config = tiny_vit_distilbert_config()
    model = _model(config)
    batch = tiny_batch(config, 4)
    torch.manual_seed(1)
    dual_encoder_grad_cache_backward(model, LOSS, batch, chunk_size=2)
    once = model.logit_scale.grad.clone()
    torch.manual_seed(1)
    dual_encoder_grad_cache_backward(model, LOSS, batch, chunk_size=2)
    torch.testing.assert_close(model.logit_scale.grad, 2 * once)
