"""Tiny random-init configs and batches, shared by the tests so each runs in well under a second."""

import torch
from transformers import BertConfig, DistilBertConfig, DistilBertModel, ViTConfig

from modeling_dualencoder import DualEncoderConfig

VOCAB = 100
MINILM_VOCAB = 30522  # the offline MiniLM tokenizer's (BERT uncased) vocabulary


def tiny_text_config():
    return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)


def tiny_bert_config():
    """A BERT-family text tower like MiniLM's (which has token types and a pooler), at toy size."""
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def tiny_vit_distilbert_config(**overrides) -> DualEncoderConfig:
    """ViT + DistilBERT, the design's default pair, at toy size (32x32 images)."""
    vision = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    fields = dict(vision_config=vision.to_dict(), text_config=tiny_text_config().to_dict(), projection_dim=16,
                  image_size=32)
    fields.update(overrides)
    return DualEncoderConfig(**fields)


def tiny_timm_config(**overrides) -> DualEncoderConfig:
    """timm's `test_efficientnet` (100k parameters) + tiny DistilBERT, with an MLP head."""
    fields = dict(timm_model_name="test_efficientnet", text_config=tiny_text_config().to_dict(), projection_dim=16,
                  image_size=32, projection_head="mlp")
    fields.update(overrides)
    return DualEncoderConfig(**fields)


def tiny_batch(config: DualEncoderConfig, batch_size: int, seq_len: int = 7, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    attention_mask[0, seq_len - 2:] = 0  # one padded row, so masked pooling is exercised
    return {
        "pixel_values": torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator),
        "input_ids": torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator),
        "attention_mask": attention_mask,
    }


def save_tiny_model_dir(path, **overrides) -> str:
    """A saved, untrained tiny timm + DistilBERT dual encoder whose tokenizer is MiniLM's (offline).

    `run_contrastive.py --model_name_or_path <dir>` and the evaluation tools accept it like any
    trained model directory, so end-to-end tests run in seconds.
    """
    from modeling_dualencoder import DualEncoderModel

    text = tiny_text_config()
    text.vocab_size = MINILM_VOCAB
    fields = dict(text_config=text.to_dict(), text_model_name_or_path="offline:all-minilm-l6-v2")
    fields.update(overrides)
    torch.manual_seed(0)
    DualEncoderModel(tiny_timm_config(**fields)).save_pretrained(path)
    return str(path)


def save_tiny_text_backbone(path) -> str:
    """A tiny random DistilBERT with MiniLM's vocabulary, saved with MiniLM's tokenizer (offline): a text
    backbone that `--text_model <path>` joins like any HF checkpoint."""
    from dualencoder.processing import load_tokenizer

    text = tiny_text_config()
    text.vocab_size = MINILM_VOCAB
    torch.manual_seed(1)
    DistilBertModel(text).save_pretrained(path)
    load_tokenizer("offline:all-minilm-l6-v2").save_pretrained(path)
    return str(path)
