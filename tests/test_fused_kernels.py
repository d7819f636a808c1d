"""The fused Triton kernels (dualencoder/kernels) compute what torch's LayerNorm, residual add and GELU do,
forward and backward, and swapping them into the towers changes neither a model's outputs nor its weights' names.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are imported:
triton reads it when a kernel is defined). Shapes are tiny because the interpreter runs each program in
Python. Tolerances: float32 kernels against torch's float32 within 1e-5 (the same sums in another order);
bfloat16 outputs within 2e-2, a few bf16 steps (8 bits of mantissa) at values of order 1.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="the fused kernels are Triton kernels; triton is not installed")

from dualencoder.kernels import triton_fused  # noqa: E402  (after TRITON_INTERPRET)
from dualencoder.kernels.fuse import (  # noqa: E402
    FusedLayerNorm, LinearBiasGelu, ResidualLayerNormOutput, fuse_module, use_fused_kernels)
from modeling_dualencoder import DualEncoderModel  # noqa: E402
from tests.tiny import tiny_batch, tiny_bert_config, tiny_text_config, tiny_vit_distilbert_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-5)


def leaves(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(DEVICE, dtype).requires_grad_() for shape in shapes]


def grads(output, tensors, seed=1):
    """Gradients of a random projection of `output` (not its sum, whose LayerNorm input gradient is 0)."""
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
    return torch.autograd.grad(output, tensors, upstream)


@pytest.mark.parametrize("width", [32, 24])  # 24: the block is wider than the row, masked lanes must not count
def test_layer_norm_matches_torch_forward_and_backward(width):
    x, weight, bias = leaves((2, 5, width), (width,), (width,))
    ours = triton_fused.layer_norm(x, weight, bias, 1e-5)
    theirs = torch.nn.functional.layer_norm(x, (width,), weight, bias, 1e-5)
    torch.testing.assert_close(ours, theirs, **FP32)
    for got, want in zip(grads(ours, (x, weight, bias)), grads(theirs, (x, weight, bias))):
        torch.testing.assert_close(got, want, **FP32)


def test_layer_norm_of_a_sum_gives_both_addends_the_gradient_of_the_sum():
    x, residual, weight, bias = leaves((7, 16), (7, 16), (16,), (16,), seed=2)
    ours = triton_fused.layer_norm(x, weight, bias, 1e-12, residual=residual)
    theirs = torch.nn.functional.layer_norm(x + residual, (16,), weight, bias, 1e-12)
    torch.testing.assert_close(ours, theirs, **FP32)
    for got, want in zip(grads(ours, (x, residual, weight, bias)), grads(theirs, (x, residual, weight, bias))):
        torch.testing.assert_close(got, want, **FP32)


def test_layer_norm_keeps_bfloat16_inputs_in_bfloat16():
    x, = leaves((4, 32), dtype=torch.bfloat16, seed=3)
    weight, bias = leaves((32,), (32,), seed=4)
    ours = triton_fused.layer_norm(x, weight, bias, 1e-5)
    assert ours.dtype == torch.bfloat16
    theirs = torch.nn.functional.layer_norm(x.float(), (32,), weight, bias, 1e-5)
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-2, atol=2e-2)
    dx, dw = grads(ours, (x, weight))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_bias_gelu_matches_torch_forward_and_backward():
    x, bias = leaves((3, 4, 40), (40,), seed=5)  # 480 elements: one partial block of the elementwise kernel
    ours = triton_fused.bias_gelu(x, bias)
    theirs = torch.nn.functional.gelu(x + bias)
    torch.testing.assert_close(ours, theirs, **FP32)
    for got, want in zip(grads(ours, (x, bias)), grads(theirs, (x, bias))):
        torch.testing.assert_close(got, want, **FP32)


def test_kernels_refuse_a_tensor_whose_width_is_not_the_parameters():
    x, bias = leaves((2, 8), (6,))
    with pytest.raises(ValueError, match="last dimension is 8"):
        triton_fused.bias_gelu(x, bias)


def test_fused_towers_give_the_same_embeddings_gradients_and_weight_names():
    """ViT + BERT: every swap but DistilBERT's FFN (next test) runs in one model."""
    config = tiny_vit_distilbert_config(text_config=tiny_bert_config().to_dict())
    torch.manual_seed(0)
    model = DualEncoderModel(config).to(DEVICE).eval()  # eval: no dropout, so both passes are deterministic
    batch = {key: value.to(DEVICE) for key, value in tiny_batch(config, 3, seq_len=5).items()}
    names = list(model.state_dict())
    want = model(**batch, return_loss=True)
    want_grads = torch.autograd.grad(want.loss, list(model.parameters()))

    counts = use_fused_kernels(model, "triton")
    # every LayerNorm of both towers, every MLP's first Linear + GELU, BERT's two residual outputs per layer
    assert counts == {"vision": {"layer_norm": 5, "linear_bias_gelu": 2, "residual_layer_norm": 0},
                      "text": {"layer_norm": 5, "linear_bias_gelu": 2, "residual_layer_norm": 4}}
    assert isinstance(model.vision_model.layers[0].layernorm_before, FusedLayerNorm)
    assert isinstance(model.vision_model.layers[0].mlp.fc1, LinearBiasGelu)
    assert isinstance(model.text_model.encoder.layer[0].output, ResidualLayerNormOutput)
    assert list(model.state_dict()) == names

    got = model(**batch, return_loss=True)
    torch.testing.assert_close(got.image_embeds, want.image_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad(got.loss, list(model.parameters()))
    for (name, _), got_grad, want_grad in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_distilbert_feed_forward_runs_its_bias_and_gelu_in_the_kernel():
    from transformers.models.distilbert.modeling_distilbert import FFN

    torch.manual_seed(0)
    ffn = FFN(tiny_text_config()).to(DEVICE).eval()
    x, = leaves((2, 3, 32), seed=6)
    want = ffn(x)
    want_grads = grads(want, (x, ffn.lin1.weight, ffn.lin1.bias))
    assert fuse_module(ffn) == {"layer_norm": 0, "linear_bias_gelu": 1, "residual_layer_norm": 0}
    assert isinstance(ffn.lin1, LinearBiasGelu) and isinstance(ffn.activation, torch.nn.Identity)
    got = ffn(x)
    torch.testing.assert_close(got, want, **FP32)
    for got_grad, want_grad in zip(grads(got, (x, ffn.lin1.weight, ffn.lin1.bias)), want_grads):
        torch.testing.assert_close(got_grad, want_grad, **FP32)


def test_fused_kernels_off_leaves_the_model_alone_and_unknown_backends_fail():
    model = DualEncoderModel(tiny_vit_distilbert_config())
    assert use_fused_kernels(model, "off") == {}
    assert not any(isinstance(m, FusedLayerNorm) for m in model.modules())
    with pytest.raises(ValueError, match="expected one of off, triton"):
        use_fused_kernels(model, "apex")
