"""fp8 training (dualencoder/kernels/fp8.py): which Linear layers are converted, and that a converted model still
trains to nearly the same numbers. On a CPU torchao's emulation does the float8 casts with float32 matmuls."""

import pytest
import torch
from torch import nn

from dualencoder.kernels.fp8 import fp8_worthy, use_fp8_matmuls
from modeling_dualencoder import DualEncoderModel
from tests.tiny import tiny_batch, tiny_bert_config, tiny_vit_distilbert_config


@pytest.mark.parametrize("layer, name, worthy", [
    (nn.Linear(768, 3072), "layers.0.mlp.fc1", True),
    (nn.Linear(768, 16), "layers.0.attention.query.lora_A.default", False),  # too narrow (an adapter)
    (nn.Linear(768, 1000), "encoder.layer.0.output.dense", False),  # 1000 is not a multiple of 16
    (nn.Linear(768, 768), "pooler.dense", False),  # one row per sample
    (nn.Conv2d(3, 768, 16), "embeddings.patch_embeddings.projection", False),
])
def test_fp8_filter_keeps_large_plain_linears_of_the_blocks(layer, name, worthy):
    assert fp8_worthy(layer, name) is worthy


def test_fp8_filter_leaves_a_linear_subclass_alone():
    class Fused(nn.Linear):
        """Like the fused LinearBiasGelu: a Linear whose forward does more than a matmul."""

    assert not fp8_worthy(Fused(768, 3072), "mlp.fc1")


def test_fp8_towers_train_to_nearly_the_same_loss_and_gradients():
    torchao = pytest.importorskip("torchao", reason="fp8 training is torchao's; torchao is not installed")
    config = tiny_vit_distilbert_config(text_config=tiny_bert_config().to_dict(), vision_pooling="pooler")
    torch.manual_seed(0)
    model = DualEncoderModel(config).eval()  # eval: no dropout, so both passes are deterministic
    batch = tiny_batch(config, 4, seq_len=5)
    names = list(model.state_dict())
    want = model(**batch, return_loss=True)
    fc1 = model.vision_model.layers[0].mlp.fc1.weight
    want_grad, = torch.autograd.grad(want.loss, [fc1])

    converted = use_fp8_matmuls(model, min_features=32)  # the tiny towers are 32 wide (MLPs 64)
    assert converted["vision"] == [f"layers.{i}.{part}" for i in range(2)
                                   for part in ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                                "attention.o_proj", "mlp.fc1", "mlp.fc2")]
    assert len(converted["text"]) == 12 and not any("pooler" in name for name in converted["text"])
    assert type(model.vision_model.layers[0].mlp.fc1).__name__ == "Float8Linear"
    assert type(model.vision_model.pooler.dense) is nn.Linear and type(model.visual_projection.net) is nn.Linear
    assert list(model.state_dict()) == names and model.vision_model.layers[0].mlp.fc1.weight is fc1

    got = model(**batch, return_loss=True)
    got_grad, = torch.autograd.grad(got.loss, [fc1])
    # e4m3 keeps 3 mantissa bits (a relative step of 1/8 at worst, 1/16 on average per element): close, not equal
    assert abs(got.loss.item() - want.loss.item()) < 0.05 * abs(want.loss.item())
    assert torch.nn.functional.cosine_similarity(got_grad.flatten(), want_grad.flatten(), dim=0) > 0.95
    assert not torch.equal(got.image_embeds, want.image_embeds), "the fp8 casts changed nothing: not converted?"
