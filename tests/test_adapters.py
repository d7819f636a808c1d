"""Specification of the adapters-only copy: LoRA in PEFT's own format, loadable by peft onto the base towers."""

import json
import os

import pytest
import timm
import torch
from peft import PeftModel
from transformers import AutoModel

from dualencoder.adapters import load_adapters, save_adapters
from modeling_dualencoder import DualEncoderModel
from tests.tiny import save_tiny_text_backbone


@pytest.fixture(scope="module")
def trained_lora_model(tmp_path_factory):
    """Tiny timm + DistilBERT towers from local files, LoRA rank 2 on both, adapters and heads 'trained'."""
    folder = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), folder / "vision.pth")
    text_path = save_tiny_text_backbone(folder / "text")
    model = DualEncoderModel.from_vision_text_pretrained(
        "timm:test_efficientnet", text_path, vision_weights=str(folder / "vision.pth"), lora_rank=2,
        lora_towers=["vision", "text"], projection_dim=16, image_size=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "projection" in name:
                p.normal_(std=0.5)  # LoRA B starts at zero: give the adapters something to change
    return model, folder, text_path


def inputs(model):
    generator = torch.Generator().manual_seed(1)
    size = model.config.image_size
    return (torch.rand(3, 3, size, size, generator=generator), torch.randint(0, 100, (3, 6), generator=generator),
            torch.ones(3, 6, dtype=torch.long))


def test_each_adapted_tower_is_saved_as_a_peft_adapter_beside_the_heads_and_config(trained_lora_model, tmp_path):
    model, _, _ = trained_lora_model
    save_adapters(model, tmp_path / "adapters")
    saved = set(os.listdir(tmp_path / "adapters"))
    assert saved >= {"config.json", "heads.safetensors", "text", "vision"} and "adapters.safetensors" not in saved
    for tower in ("vision", "text"):
        assert sorted(os.listdir(tmp_path / "adapters" / tower)) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]
        peft_config = json.loads((tmp_path / "adapters" / tower / "adapter_config.json").read_text())
        assert (peft_config["peft_type"], peft_config["r"]) == ("LORA", 2)
        assert peft_config["base_model_name_or_path"] is None  # a local base folder is not written into the copy


def test_peft_alone_puts_the_saved_adapters_on_the_base_towers_and_gives_the_trained_outputs(trained_lora_model,
                                                                                              tmp_path):
    model, folder, text_path = trained_lora_model
    save_adapters(model, tmp_path / "adapters")
    pixels, ids, mask = inputs(model)
    base_vision = timm.create_model("test_efficientnet", num_classes=0)
    base_vision.load_state_dict(torch.load(folder / "vision.pth"))
    vision = PeftModel.from_pretrained(base_vision, str(tmp_path / "adapters" / "vision")).eval()
    text = PeftModel.from_pretrained(AutoModel.from_pretrained(text_path), str(tmp_path / "adapters" / "text")).eval()
    with torch.no_grad():
        torch.testing.assert_close(vision(pixels), model.vision_model(pixels))
        torch.testing.assert_close(text(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state)
        with text.disable_adapter():  # the adapters are what makes the towers match the trained ones
            assert not torch.allclose(text(input_ids=ids, attention_mask=mask).last_hidden_state,
                                      model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_load_adapters_rebuilds_the_trained_model_from_the_base_towers_and_the_peft_adapters(trained_lora_model,
                                                                                              tmp_path):
    model, _, _ = trained_lora_model
    save_adapters(model, tmp_path / "adapters")
    rebuilt = load_adapters(tmp_path / "adapters").eval()
    pixels, ids, mask = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.get_image_features(pixels), model.get_image_features(pixels))
        torch.testing.assert_close(rebuilt.get_text_features(ids, mask), model.get_text_features(ids, mask))
    assert (rebuilt.config.lora_rank, rebuilt.config.lora_towers) == (2, ["vision", "text"])
    assert set(rebuilt.adapter_state_dict()) == set(model.adapter_state_dict())  # same names: it trains on as before


def test_a_copy_missing_a_towers_adapter_is_refused_naming_the_file(trained_lora_model, tmp_path):
    model, _, _ = trained_lora_model
    save_adapters(model, tmp_path / "adapters")
    os.remove(tmp_path / "adapters" / "text" / "adapter_config.json")
    with pytest.raises(ValueError, match=r"adapters/text/adapter_config.json is missing"):
        load_adapters(tmp_path / "adapters")


def test_a_copy_saved_before_the_peft_format_still_loads(trained_lora_model, tmp_path):
    """Earlier exports hold config.json and one adapters.safetensors (adapters and heads together)."""
    from safetensors.torch import save_file

    model, _, _ = trained_lora_model
    model.config.save_pretrained(tmp_path / "old")
    tensors = {k: v.contiguous() for k, v in model.adapter_state_dict().items()}
    save_file(tensors, tmp_path / "old" / "adapters.safetensors")
    rebuilt = load_adapters(tmp_path / "old").eval()
    pixels, ids, mask = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.get_text_features(ids, mask), model.get_text_features(ids, mask))
        torch.testing.assert_close(rebuilt.get_image_features(pixels), model.get_image_features(pixels))


def test_adding_lora_prints_no_warning_about_peft_internals(tmp_path):
    import warnings

    text_path = save_tiny_text_backbone(tmp_path / "text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DualEncoderModel.from_vision_text_pretrained("timm:test_efficientnet", text_path, lora_rank=2,
                                                     lora_towers=["text"], projection_dim=16, image_size=32)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
