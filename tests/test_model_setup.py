"""The options that shape a model are one table derived from DualEncoderConfig's fields: each is applied to a
new model, and with --model_name_or_path each is either applied (how the model runs) or refused by name."""

import pytest

from dualencoder.training.arguments import parse_args
from dualencoder.training.model_setup import (CONFIG_FIELDS, MODEL_OPTIONS, RUNTIME_OPTIONS, build_model,
                                              new_model_fields)
from modeling_dualencoder import DualEncoderConfig
from tests.tiny import save_tiny_model_dir

# A value for each option that the tiny saved model does not have (checked below).
OTHER_VALUE = {"image_size": 48, "projection_dim": 24, "projection_head": "mlp", "projection_hidden_dim": 40,
               "projection_dropout": 0.3, "text_pooling": "cls", "logit_scale_init_value": 1.0,
               "logit_bias_init_value": -5.0, "lora_rank": 4, "lora_alpha": 4.0, "lora_dropout": 0.2,
               "lora_towers": ["vision"], "lora_vision_blocks": 1, "lora_text_blocks": 1,
               "image_flip_average": True, "vision_chunk_size": 2}


def as_argv(option, value) -> list[str]:
    return [f"--{option}", *(value if isinstance(value, list) else [str(value)])]


@pytest.fixture(scope="module")
def no_config(tmp_path_factory):
    """An empty config file: only the built-in defaults and the options a test gives apply."""
    path = tmp_path_factory.mktemp("config") / "empty.yaml"
    path.write_text("{}\n")
    return ["--config", str(path)]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("saved"), projection_head="linear", projection_dim=16)


def test_the_table_is_every_option_named_as_a_config_field_and_this_test_covers_each():
    assert set(MODEL_OPTIONS) <= CONFIG_FIELDS and set(RUNTIME_OPTIONS) <= set(MODEL_OPTIONS)
    assert set(OTHER_VALUE) == set(MODEL_OPTIONS), "a new model option needs a value here"


@pytest.mark.parametrize("option", sorted(OTHER_VALUE))
def test_each_model_option_sets_its_field_of_a_new_model(option, no_config):
    model_args, _, _ = parse_args(no_config + as_argv(option, OTHER_VALUE[option]) + ["--lora_rank", "4"] * (option != "lora_rank"))
    fields = new_model_fields(model_args)
    assert fields[option] == OTHER_VALUE[option]


@pytest.mark.parametrize("option", sorted(OTHER_VALUE))
def test_a_saved_model_applies_a_runtime_option_and_refuses_a_structural_one_by_name(saved_model, option, no_config):
    value = OTHER_VALUE[option]
    model_args, _, _, stated = parse_args(no_config + ["--model_name_or_path", saved_model, "--head_init", "random",
                                                      *as_argv(option, value)], with_sources=True)
    saved = DualEncoderConfig.from_pretrained(saved_model)
    assert getattr(saved, option, None) != value
    if option in RUNTIME_OPTIONS:
        assert getattr(build_model(model_args, stated).config, option) == value
    else:
        with pytest.raises(SystemExit, match=f"--{option} "):
            build_model(model_args, stated)
        unstated = build_model(model_args)  # not stated (a default that differs, say): the saved model keeps its own
        assert getattr(unstated.config, option) == getattr(saved, option)


def test_the_loss_is_not_part_of_the_model_a_saved_model_trains_with_any_and_records_it(saved_model, no_config):
    model_args, _, _ = parse_args(no_config + ["--model_name_or_path", saved_model, "--head_init", "random", "--loss",
                                   "clip+triplet", "--loss_options", "{margin: 0.3}"])
    config = build_model(model_args).config
    assert (config.loss_type, config.loss_kwargs) == ("clip+triplet", {"margin": 0.3})
