"""Specification of the training options (dualencoder/training/arguments.py): one table of fields drives parsing,
checking and the grouped --help; the dataclass defaults are the default job; a YAML file's values pass the same
checks as the command line's, and every bad value is one line naming the option, the value and where it came from."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dualencoder.training.arguments import ARGUMENT_CLASSES, GROUPS, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def options(parsed) -> dict:
    return {key: value for args in parsed for key, value in vars(args).items()}


def refusal(capsys, argv) -> str:
    """The one line parse_args writes for a bad option, having checked it exits with argparse's code 2."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def config_file(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exited:
        parse_args([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


# --- reading a file and the command line ---------------------------------------------------------------------------

def test_yaml_config_is_read_and_the_command_line_overrides_it(tmp_path):
    config = config_file(tmp_path, "learning_rate: 0.001\nnum_train_epochs: 7\nlora_towers: [vision, text]\n")
    model_args, data_args, train_args = parse_args(["--config", config, "--num_train_epochs", "2"])
    assert train_args.learning_rate == 0.001 and train_args.num_train_epochs == 2
    assert model_args.lora_towers == ["vision", "text"]
    assert data_args.dataset == "synthetic"


def test_a_config_file_given_as_config_equals_file_is_read_too():
    spaced = parse_args(["--config", str(CONFIGS / "flickr8k_offline.yaml")])
    joined = parse_args([f"--config={CONFIGS / 'flickr8k_offline.yaml'}"])
    assert joined == spaced and joined[2].output_dir == "outputs/flickr8k_offline"


def test_loss_options_can_be_a_yaml_mapping_or_a_command_line_string(tmp_path):
    config = config_file(tmp_path, "loss: clip+triplet\nloss_options: {margin: 0.1, triplet_weight: 0.5}\n")
    model_args, _, _ = parse_args(["--config", config])
    assert yaml.safe_load(model_args.loss_options) == {"margin": 0.1, "triplet_weight": 0.5}
    model_args, _, _ = parse_args(["--loss_options", "{margin: 0.3}"])
    assert yaml.safe_load(model_args.loss_options) == {"margin": 0.3}


def test_booleans_and_none_read_the_same_from_a_file_and_the_command_line(tmp_path):
    config = config_file(tmp_path, "augment: yes\nflip_augment: true\nmixed_precision: no\nimage_size: null\n")
    from_file = options(parse_args(["--config", config]))
    from_command_line = options(parse_args(["--augment", "--flip_augment", "true", "--mixed_precision", "no",
                                            "--image_size", "none"]))
    for parsed in (from_file, from_command_line):
        # YAML 1.1 would read `mixed_precision: no` as False; here only true/false are booleans
        assert parsed["augment"] is True and parsed["flip_augment"] is True
        assert parsed["mixed_precision"] == "no" and parsed["image_size"] is None


@pytest.mark.parametrize("value", ["vision", "[vision]", "[vision, text]"])
def test_lora_towers_is_a_list_of_tower_names_given_as_a_list_or_one_name(tmp_path, value):
    expected = ["vision", "text"] if "text" in value else ["vision"]
    assert parse_args(["--config", config_file(tmp_path, f"lora_towers: {value}\n")])[0].lora_towers == expected
    words = expected if "[" in value else [value]
    assert parse_args(["--lora_towers", *words])[0].lora_towers == expected


# --- one source of defaults ----------------------------------------------------------------------------------------

def test_the_default_job_file_states_the_dataclass_defaults():
    stated = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    defaults = options(parse_args([]))
    assert {key: defaults[key] for key in stated} == stated
    assert parse_args([]) == parse_args(["--config", str(CONFIGS / "default.yaml")])


def test_options_a_config_file_leaves_out_are_the_default_jobs(tmp_path):
    # before: a file's unstated options fell back to other built-in defaults (full towers, no LoRA, 3 epochs)
    parsed = options(parse_args(["--config", config_file(tmp_path, "output_dir: /tmp/x\n")]))
    assert parsed == {**options(parse_args([])), "output_dir": "/tmp/x"}
    assert parsed["vision_train"] == "frozen" and parsed["lora_rank"] == 8 and parsed["num_train_epochs"] == 2


def test_the_shipped_configs_keep_what_the_old_defaults_gave_them():
    offline = options(parse_args(["--config", str(CONFIGS / "flickr8k_offline.yaml")]))
    assert offline["lora_rank"] == 0 and offline["vision_train"] == "top:8" and offline["text_train"] == "top:2"
    assert options(parse_args(["--config", str(CONFIGS / "flickr8k_vit_distilbert.yaml")]))["image_size"] is None


def test_the_tiny_test_config_is_a_small_job():
    tiny = options(parse_args(["--config", str(CONFIGS / "tiny_test.yaml")]))
    assert tiny["num_images"] <= 30 and tiny["num_train_epochs"] == 1 and tiny["image_size"] <= 32
    assert tiny["vision_model"] == "timm:test_efficientnet" and tiny["report_to"] == "none"
    # the tests fine-tune tiny saved models with it: it leaves the options that make a new model at the defaults
    assert all(tiny[key] == default for key, default in options(parse_args([])).items()
               if key in ("projection_dim", "projection_head", "lora_rank", "loss", "text_pooling"))


def test_help_with_a_config_file_shows_the_values_that_apply_with_it(capsys):
    plain = " ".join(help_text(capsys).split())
    tiny = " ".join(help_text(capsys, "--config", str(CONFIGS / "tiny_test.yaml")).split())
    assert "(default: 2)" in plain.split("--num_train_epochs")[1].split("--")[0]
    assert f"({CONFIGS / 'tiny_test.yaml'}: 1)" in tiny.split("--num_train_epochs")[1].split("--max_steps")[0]


# --- --help ------------------------------------------------------------------------------------------------------

def test_every_option_has_a_group_and_a_help():
    for cls in ARGUMENT_CLASSES:
        for field in dataclasses.fields(cls):
            assert field.metadata.get("group") in GROUPS, field.name
            assert len(field.metadata.get("help", "")) > 10, field.name


def test_help_is_grouped_by_purpose_and_carries_no_measured_speeds(capsys):
    shown = help_text(capsys)
    for group in ("model", "data", "training", "speed", "evaluation", "research"):
        assert f"\n{group} options:\n" in shown
    assert "--gradient_checkpointing" in shown.split("speed options:")[1].split("evaluation options:")[0]
    text = " ".join(shown.split())
    assert "samples/s" not in text and not re.search(r"\d(\.\d+)?x (faster|speed)|\b\d+(\.\d+)?x\b", text)


def test_the_options_module_keeps_lines_within_120_characters():
    source = (REPO / "dualencoder" / "training" / "arguments.py").read_text().splitlines()
    assert [number for number, line in enumerate(source, 1) if len(line) > 120] == []


# --- every value checked, from a file and the command line alike --------------------------------------------------

BAD_VALUES = [  # option, value as YAML, what the error says
    ("head_learning_rate", "true", "expected a number >= 0.0"),  # trained at lr 1.0 before
    ("learning_rate", "-0.0001", "expected a number >= 0.0"),  # gradient ascent, exit 0, before
    ("learning_rate", "[0.1]", "expected a number"),  # a traceback before
    ("max_length", "2", "expected a whole number >= 4"),  # every caption [CLS][SEP] before
    ("max_length", "0", "expected a whole number >= 4"),  # no truncation at all before
    ("num_train_epochs", "2.5", "expected a whole number >= 1"),  # 3 epochs before
    ("per_device_train_batch_size", "0", "expected a whole number >= 1"),
    ("per_device_eval_batch_size", "-1", "expected a whole number >= 1"),
    ("gradient_accumulation_steps", "0", "expected a whole number >= 1"),  # ZeroDivisionError before
    ("warmup_ratio", "1.0", "expected a number >= 0.0 and < 1.0"),
    ("lora_dropout", "1", "< 1.0"),
    ("projection_dropout", "-0.1", ">= 0.0"),
    ("topic_share", "1.5", "<= 1.0"),
    ("logging_steps", "0", "expected a whole number >= 1"),
    ("gradient_checkpointing", "maybe", "expected true or false"),
    ("on_bad_image", "skp", "expected one of error, skip; did you mean skip?"),
    ("mixed_precision", "bf61", "expected one of no, fp16, bf16; did you mean bf16?"),
    ("metric_for_best_model", "i2t_R1", "did you mean i2t_r1?"),
    ("lora_towers", "[visoin]", "expected a list of vision and/or text; did you mean vision?"),
    ("vision_train", "top:0", "expected full, frozen or top:N with N >= 1"),
    ("loss", "clip+tripplet", "unknown loss 'tripplet'"),
    ("loss_options", "'[1, 2]'", "expected a mapping"),
]


@pytest.mark.parametrize("name, value, what", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_a_bad_value_in_a_config_file_is_one_line_naming_the_file_option_and_rule(tmp_path, capsys, name, value,
                                                                                     what):
    config = config_file(tmp_path, f"{name}: {value}\n")
    line = refusal(capsys, ["--config", config])
    assert line.startswith(f"error: {config}: --{name} ") and what in line


@pytest.mark.parametrize("name, value, what", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_a_bad_value_on_the_command_line_is_refused_by_the_same_rule(capsys, name, value, what):
    given = yaml.safe_load(f"x: {value}")["x"]
    words = [str(item) for item in given] if isinstance(given, list) and name == "lora_towers" else [value]
    line = refusal(capsys, [f"--{name}", *words])
    assert line.startswith(f"error: command line: --{name} ") and what.split(";")[0] in line


def test_values_within_the_rules_pass_unchanged(tmp_path):
    parsed = options(parse_args(["--metric_for_best_model", "t2i_medr", "--vision_train", "top:3", "--loss",
                                 "clip+triplet", "--lora_towers", "vision,text", "--warmup_ratio", "0",
                                 "--learning_rate", "1e-4", "--max_length", "4", "--feature_cache_dir", ""]))
    assert (parsed["metric_for_best_model"], parsed["vision_train"], parsed["loss"]) == ("t2i_medr", "top:3",
                                                                                          "clip+triplet")
    assert parsed["lora_towers"] == ["vision", "text"] and parsed["warmup_ratio"] == 0.0
    assert parsed["learning_rate"] == 1e-4 and parsed["max_length"] == 4 and parsed["feature_cache_dir"] == ""


def test_a_learning_rate_list_on_the_command_line_is_refused(capsys):
    assert refusal(capsys, ["--learning_rate", "0.1", "0.2"]) == \
        "error: command line: --learning_rate takes one value, got another: 0.2"


def test_the_command_line_overrides_a_bad_value_only_where_the_file_is_read_first(tmp_path, capsys):
    # a file's values are checked when the file is read, so the error names the file, not the override
    line = refusal(capsys, ["--config", config_file(tmp_path, "max_length: 2\n"), "--max_length", "16"])
    assert "c.yaml: --max_length 2" in line


def test_unknown_options_are_errors_that_name_them_and_suggest_the_closest(tmp_path, capsys):
    config = config_file(tmp_path, "learning_rat: 0.001\n")
    line = refusal(capsys, ["--config", config])
    assert config in line and "'learning_rat'" in line and "did you mean learning_rate?" in line
    line = refusal(capsys, ["--num_train_epoch", "2"])
    assert "--num_train_epoch" in line and "did you mean --num_train_epochs?" in line


def test_a_yaml_syntax_error_is_one_line_with_the_file_and_line(tmp_path, capsys):
    config = config_file(tmp_path, "learning_rate: 0.001\nlora_towers: [vision, text\nseed: 1\n")
    line = refusal(capsys, ["--config", config])
    assert line.startswith(f"error: {config}: line ") and "not valid YAML" in line


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert str(tmp_path / "none.yaml") in refusal(capsys, ["--config", str(tmp_path / "none.yaml")])


def test_rules_between_options_name_the_file_that_set_them(tmp_path, capsys):
    line = refusal(capsys, ["--config", config_file(tmp_path, "topic_batches: 3\n")])
    assert line.startswith(f"error: {tmp_path / 'c.yaml'}: --topic_batches draws whole images by topic")
    assert "--head_init cca needs --projection_head mlp" in refusal(
        capsys, ["--head_init", "cca", "--projection_head", "linear"])


def test_a_bad_option_exits_with_code_2_and_one_line_without_a_traceback(tmp_path):
    config = config_file(tmp_path, "gradient_accumulation_steps: 0\n")
    result = subprocess.run([sys.executable, "-c", "import sys; from dualencoder.training.arguments import parse_args; "
                             "parse_args(sys.argv[1:])", "--config", config], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"error: {config}: --gradient_accumulation_steps 0: expected a whole number >= 1\n"


# --- the new options ---------------------------------------------------------------------------------------------

def test_the_new_data_and_speed_options_parse_with_their_defaults_off():
    parsed = options(parse_args([]))
    assert {key: parsed[key] for key in ("train_file", "validation_file", "test_file", "dataset_config_name")} == \
        dict.fromkeys(("train_file", "validation_file", "test_file", "dataset_config_name"))
    assert not parsed["gradient_checkpointing"] and parsed["image_column"] is None  # columns guessed by default
    given = options(parse_args(["--train_file", "pairs.csv", "--image_column", "path", "--caption_column", "text",
                                "--gradient_checkpointing"]))
    assert (given["train_file"], given["image_column"], given["caption_column"]) == ("pairs.csv", "path", "text")
    assert given["gradient_checkpointing"]


def test_streaming_needs_max_steps_and_refuses_options_that_need_every_training_row_first(capsys):
    assert options(parse_args(["--streaming", "true", "--max_steps", "100"]))["streaming"] is True
    assert "--streaming true needs --max_steps N: a stream's epoch has no length known in advance" in refusal(
        capsys, ["--streaming", "true"])
    line = refusal(capsys, ["--streaming", "true", "--max_steps", "100", "--batch_by_image", "true"])
    assert line.startswith("error: command line: --batch_by_image true does not work with --streaming true: batches")
    assert "--pixel_store_size 64 does not work with --streaming true" in refusal(
        capsys, ["--streaming", "true", "--max_steps", "9", "--pixel_store_size", "64"])
