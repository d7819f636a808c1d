"""Specification of the model card's Hub metadata, read back as the Hub reads it (huggingface_hub's ModelCard)."""

import pytest
from huggingface_hub import ModelCard

from dualencoder.training.arguments import parse_args
from dualencoder.training.model_card import write_model_card
from tests.tiny import tiny_timm_config, tiny_vit_distilbert_config

TEST_METRICS = {"i2t_r1": 31.25, "i2t_r5": 62.5, "i2t_r10": 75.0, "i2t_medr": 3.0, "i2t_meanr": 5.1,
                "t2i_r1": 25.0, "t2i_r5": 50.0, "t2i_r10": 68.75, "t2i_medr": 5.0, "t2i_meanr": 7.2, "rsum": 312.5}


def card_for(tmp_path, model_config, *options, adapters=False) -> ModelCard:
    args = parse_args(["--output_dir", str(tmp_path / "out"), *options])
    write_model_card(str(tmp_path), model_config=model_config, args=args, metrics={"test": TEST_METRICS},
                     results=("test", TEST_METRICS), lora_towers=("text",) if adapters else (), adapters=adapters)
    return ModelCard.load(tmp_path / "README.md")


def test_the_card_names_the_towers_hub_originals_license_hub_data_set_and_retrieval_results(tmp_path):
    config = tiny_timm_config(vision_model_name_or_path="offline:efficientnet-lite0",
                              text_model_name_or_path="offline:all-minilm-l6-v2")
    card = card_for(tmp_path, config, "--dataset", "someone/flickr8k-captions", "--license", "mit",
                    "--hub_model_id", "me/flickr8k-clip")
    assert card.data.base_model == ["timm/tf_efficientnet_lite0.in1k", "sentence-transformers/all-MiniLM-L6-v2"]
    assert card.data.license == "mit" and card.data.datasets == ["someone/flickr8k-captions"]
    assert (card.data.pipeline_tag, card.data.library_name) == ("zero-shot-image-classification", "transformers")
    assert card.data.model_name == "flickr8k-clip"
    results = {(r.task_type, r.metric_type): r for r in card.data.eval_results}
    assert {key: r.metric_value for key, r in results.items()} == {
        ("image-to-text", "recall@1"): 31.25, ("image-to-text", "recall@5"): 62.5,
        ("image-to-text", "recall@10"): 75.0, ("text-to-image", "recall@1"): 25.0,
        ("text-to-image", "recall@5"): 50.0, ("text-to-image", "recall@10"): 68.75}
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("someone/flickr8k-captions", "test")}


def test_a_local_data_set_is_named_by_its_folder_never_listed_as_a_hub_data_set_nor_by_its_path(tmp_path):
    photos = tmp_path / "my_photos"
    photos.mkdir()
    card = card_for(tmp_path, tiny_timm_config(), "--dataset", str(photos))
    assert card.data.datasets is None
    assert {r.dataset_name for r in card.data.eval_results} == {"my_photos"}
    assert str(tmp_path) not in card.data.to_yaml()
    assert card_for(tmp_path, tiny_timm_config(), "--dataset", "synthetic").data.datasets is None


@pytest.mark.parametrize("config, adapters, needs, not_needed", [
    (tiny_timm_config(), False, "`pip install transformers torch timm`", "peft"),
    (tiny_vit_distilbert_config(), False, "`pip install transformers torch`", "timm"),
    (tiny_vit_distilbert_config(text_model_name_or_path="distilbert-base-uncased"), True,
     "`pip install transformers torch`", "timm"),
], ids=["timm-tower", "hf-towers", "with-adapters"])
def test_the_card_says_which_packages_loading_needs(tmp_path, config, adapters, needs, not_needed):
    text = card_for(tmp_path, config, adapters=adapters).text
    section = text.split("## What loading needs")[1].split("##")[0]
    assert needs in section and not_needed not in section
    assert ("`pip install peft`" in section) is adapters
    if adapters:  # the adapters' own usage: peft onto the tower's Hub original, from the repository's subfolder
        assert ('text = PeftModel.from_pretrained(AutoModel.from_pretrained("distilbert-base-uncased"), '
                f'"{tmp_path}", subfolder="adapters/text")') in text


def test_a_timm_vision_towers_adapters_are_put_on_the_timm_model_of_its_hub_original(tmp_path):
    config = tiny_timm_config(vision_model_name_or_path="offline:efficientnet-lite0",
                              text_model_name_or_path="offline:all-minilm-l6-v2")
    args = parse_args(["--hub_model_id", "me/clip"])
    write_model_card(str(tmp_path), model_config=config, args=args, metrics={}, lora_towers=("vision", "text"),
                     adapters=True)
    text = ModelCard.load(tmp_path / "README.md").text
    assert ('vision = PeftModel.from_pretrained(timm.create_model("hf-hub:timm/tf_efficientnet_lite0.in1k", '
            'pretrained=True, num_classes=0), "me/clip", subfolder="adapters/vision")') in text
    assert ('text = PeftModel.from_pretrained(AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2"), '
            '"me/clip", subfolder="adapters/text")') in text
