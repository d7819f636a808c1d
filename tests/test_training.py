"""Specification of run_contrastive.py: options, an end-to-end run, crash-safe resume, divergence."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_contrastive
from dualencoder.training import data as training_data, model_setup
from dualencoder.training.step import TrainingDiverged
from data_scripts import ImageTransform, to_image_view
from dualencoder.evaluation.embed import embed_split
from dualencoder.losses import build_loss
from dualencoder.processing import build_processor
from dualencoder.querybank import querybank_metrics
from modeling_dualencoder import DualEncoderModel
from dualencoder.training.arguments import parse_args
from dualencoder.training.checkpoints import list_checkpoints, move_into, recover_swap, resolve_resume, write_atomically
from tests.tiny import MINILM_VOCAB, save_tiny_model_dir, save_tiny_text_backbone, tiny_text_config, tiny_timm_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


def tiny_run_args(model_dir, output_dir, *extra):
    """A tiny run's options. It does not evaluate before training: that state would be the first best-model
    candidate, and a tiny model a few steps in is often no better, so the tests of what training did would compare
    untrained exports (the tests of that candidate pass --eval_before_training true)."""
    return ["--config", str(REPO / "configs" / "tiny_test.yaml"), "--model_name_or_path", model_dir, "--output_dir", str(output_dir), "--dataset", "synthetic",
            "--num_images", "30", "--synthetic_image_size", "32", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--num_train_epochs", "2", "--report_to", "none",
            "--logging_steps", "1", "--head_learning_rate", "1e-2", "--feature_cache_dir", "",
            "--eval_before_training", "false", *extra]


def test_loss_options_without_a_space_after_the_colon_say_how_to_write_them():
    # YAML reads {margin:0.2} as a key 'margin:0.2' with no value: the error names it and the fix
    model_args, _, _ = parse_args(["--loss", "clip+triplet", "--loss_options", "{margin:0.2}"])
    with pytest.raises(SystemExit, match=r"'margin:0.2' needs a space after ':'.*\{margin: 0.2\}"):
        model_setup.build_model(model_args)


def test_every_shipped_config_parses_and_builds_its_loss():
    for config in sorted((REPO / "configs").glob("*.yaml")):
        model_args, _, _ = parse_args(["--config", str(config)])
        build_loss(model_args.loss, **model_setup.loss_options(model_args))  # unknown options raise


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, "run_contrastive.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "--resume_from_checkpoint" in result.stdout and "latest, or a checkpoint directory" in result.stdout


def test_tiny_run_trains_evaluates_and_exports_a_loadable_model(tiny_model_dir, tmp_path):
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--eval_before_training", "true"))
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("before_training", "validation", "test"):
        assert set(saved[key]) >= {"i2t_r1", "t2i_r1", "rsum"}
    assert saved["test"] == pytest.approx(metrics["test"])
    assert saved["global_step"] == metrics["global_step"] > 0
    assert (out / "README.md").read_text().count("| trained") == 0  # card table rows are named below
    assert "| test |" in (out / "README.md").read_text()
    assert f'from_pretrained("{out}"' in (out / "README.md").read_text()  # the usage names where the model is
    assert not (out / ".export.tmp").exists()  # the staging folder the export is written to, then moved in
    history = json.loads((out / "log_history.json").read_text())
    assert any("loss" in r for r in history) and any("rsum" in r for r in history)
    from transformers import AutoProcessor

    from modeling_dualencoder import DualEncoderModel

    model = DualEncoderModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.size["height"] == model.config.image_size
    # The exported weights are the best checkpoint's.
    best_dir = json.loads((Path(list_checkpoints(str(out))[-1]) / "trainer_state.json").read_text())["best_dir"]
    best = load_file(out / "checkpoints" / best_dir / "model.safetensors")
    final = load_file(out / "model.safetensors")
    torch.testing.assert_close(final["visual_projection.net.0.weight"], best["visual_projection.net.0.weight"])


@pytest.fixture(scope="module")
def plain_one_epoch_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return out, run_contrastive.main(tiny_run_args(tiny_model_dir, out, "--num_train_epochs", "1"))


@pytest.mark.parametrize("speedup, atol", [
    (["--torch_compile", "true", "--torch_compile_backend", "eager"], 1e-5),  # scope: blocks
    (["--torch_compile", "true", "--torch_compile_backend", "eager", "--torch_compile_scope", "model"], 1e-5),
    (["--channels_last", "true"], None),  # NHWC convolutions sum in another order: last-bit differences, then Adam
], ids=["compile-blocks", "compile-model", "channels-last"])
def test_speed_options_train_to_the_same_weights_and_save_the_same_parameter_names(tiny_model_dir, tmp_path,
                                                                                   plain_one_epoch_run, speedup, atol):
    """torch_compile compiles the model in place and channels_last only changes the conv weights'
    memory layout: checkpoints, the export and the numbers stay as they are. (The eager backend
    traces the same graphs as inductor without generating kernels, so CPU CI checks the tracing in
    seconds; the speed is measured on a GPU by benchmarks/throughput.py.)"""
    plain_dir, plain = plain_one_epoch_run
    fast = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "fast", "--num_train_epochs", "1", *speedup))
    assert fast["test"] == pytest.approx(plain["test"])
    a, b = load_file(plain_dir / "model.safetensors"), load_file(tmp_path / "fast" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if atol is not None:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol)
        else:  # Adam turns last-bit gradient differences into whole steps for a few near-zero gradients:
            # the tensor as a whole must still agree to 0.1%
            x, y = a[key].double(), b[key].double()
            assert (x - y).norm() <= 1e-3 * x.norm() + 1e-6, key


def test_frozen_tower_features_are_cached_and_training_still_learns_the_heads(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    cache_dir = tmp_path / "features"
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--vision_train", "frozen",
                                                 "--feature_cache_dir", str(cache_dir)))
    assert "caching its features" in caplog.text
    assert metrics["test"]["rsum"] > 0
    assert len(list(cache_dir.glob("vision-*.pt"))) == 1


def test_a_cached_vision_prefix_trains_the_top_blocks_exactly_like_running_the_whole_tower(tiny_model_dir, tmp_path,
                                                                                            caplog):
    caplog.set_level("INFO")
    cache_dir = tmp_path / "features"
    top = ("--vision_train", "top:1", "--text_train", "frozen", "--learning_rate", "1e-3", "--num_train_epochs", "1")
    cached = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "cached", *top, "--prefix_cache_dtype",
                                                "float32", "--feature_cache_dir", str(cache_dir)))
    assert "caching their output" in caplog.text
    assert len(list(cache_dir.glob("vision-prefix-*.pt"))) == 1
    whole = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "whole", *top, "--cache_frozen_features", "false"))
    cached_weights, whole_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("cached", "whole"))
    untrained = load_file(Path(tiny_model_dir) / "model.safetensors")
    head_conv = next(k for k in cached_weights if k.startswith("vision_model.conv_head"))
    assert not torch.equal(cached_weights[head_conv], untrained[head_conv])  # the top of the tower trained
    for key in cached_weights:
        torch.testing.assert_close(cached_weights[key], whole_weights[key], atol=1e-4, rtol=1e-3, msg=key)
    assert cached["test"] == pytest.approx(whole["test"], abs=1e-6)


def test_a_cached_text_prefix_trains_the_top_layers_exactly_like_running_the_whole_tower(tmp_path, caplog):
    caplog.set_level("INFO")
    text = tiny_text_config()
    text.vocab_size, text.dropout, text.attention_dropout = MINILM_VOCAB, 0.0, 0.0  # dropout would draw other masks
    model_dir = save_tiny_model_dir(tmp_path / "model", text_config=text.to_dict())
    top = ("--vision_train", "frozen", "--text_train", "top:1", "--learning_rate", "1e-3", "--num_train_epochs", "1")
    cached = run_contrastive.main(tiny_run_args(model_dir, tmp_path / "cached", *top, "--prefix_cache_dtype", "float32"))
    assert "text layers below 1 are frozen" in caplog.text
    whole = run_contrastive.main(tiny_run_args(model_dir, tmp_path / "whole", *top, "--cache_frozen_features", "false"))
    cached_weights, whole_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("cached", "whole"))
    untrained = load_file(Path(model_dir) / "model.safetensors")
    top_layer = next(k for k in cached_weights if k.startswith("text_model.transformer.layer.1."))
    assert not torch.equal(cached_weights[top_layer], untrained[top_layer])  # the top layer trained
    for key in cached_weights:
        torch.testing.assert_close(cached_weights[key], whole_weights[key], atol=1e-4, rtol=1e-3, msg=key)
    assert cached["test"] == pytest.approx(whole["test"], abs=1e-6)


def test_adapters_in_the_top_text_layer_train_on_the_cached_prefix_like_the_whole_tower(tmp_path, caplog):
    caplog.set_level("INFO")
    text = tiny_text_config()
    text.vocab_size, text.dropout, text.attention_dropout = MINILM_VOCAB, 0.0, 0.0
    model_dir = save_tiny_model_dir(tmp_path / "model", text_config=text.to_dict(), lora_rank=2, lora_towers=["text"],
                                    lora_text_blocks=1)
    frozen = ("--vision_train", "frozen", "--text_train", "frozen", "--lora_learning_rate", "1e-2", "--num_train_epochs", "1",
              "--save_adapters", "false")
    cached = run_contrastive.main(tiny_run_args(model_dir, tmp_path / "cached", *frozen, "--prefix_cache_dtype", "float32"))
    assert "text layers below 1 are frozen" in caplog.text
    whole = run_contrastive.main(tiny_run_args(model_dir, tmp_path / "whole", *frozen, "--cache_frozen_features", "false"))
    # The exported model has its adapters merged: only the top layer's adapted weights may differ from the untrained.
    cached_weights, whole_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("cached", "whole"))
    untrained = DualEncoderModel.from_pretrained(model_dir).merge_adapters().state_dict()
    changed = {k for k in cached_weights if k.startswith("text_model") and not torch.equal(cached_weights[k], untrained[k])}
    assert changed and all(".layer.1.attention." in k for k in changed), sorted(changed)
    for key in cached_weights:
        torch.testing.assert_close(cached_weights[key], whole_weights[key], atol=1e-4, rtol=1e-3, msg=key)
    assert cached["test"] == pytest.approx(whole["test"], abs=1e-6)


def test_batches_by_image_take_every_caption_of_each_image_in_one_step(tiny_model_dir, tmp_path):
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--vision_train", "top:1",
                                                 "--freeze_batchnorm", "true", "--batch_by_image", "true",
                                                 "--captions_per_image", "0", "--per_device_train_batch_size", "4"))
    train_images = len(set(training_data.load_data(parse_args(["--dataset", "synthetic", "--num_images", "30"])[1],
                                                     seed=42)[0]["image_id"]))
    assert metrics["global_step"] == 2 * -(-train_images // 4)  # 2 epochs of 4 images (all their captions) a step
    assert metrics["test"]["rsum"] > 0


def test_topic_batches_cluster_the_training_images_once_and_keep_the_topics_for_resume(tiny_model_dir, tmp_path, caplog,
                                                                                       capsys):
    caplog.set_level("INFO")
    out = tmp_path / "out"
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, out, "--batch_by_image", "true", "--captions_per_image", "0",
                                                 "--per_device_train_batch_size", "4", "--topic_batches", "3",
                                                 "--topic_share", "0.5"))
    assert metrics["test"]["rsum"] > 0
    assert "topic batches:" in caplog.text and "in 3 topics" in caplog.text
    state = json.loads((Path(list_checkpoints(str(out))[-1]) / "trainer_state.json").read_text())
    train_ids = set(training_data.load_data(parse_args(["--dataset", "synthetic", "--num_images", "30"])[1],
                                              seed=42)[0]["image_id"])
    assert set(state["topics"]) == train_ids and set(state["topics"].values()) == {0, 1, 2}
    # Resumed (even with another --topic_batches), the run reads its topics from the checkpoint, clusters nothing.
    caplog.clear()
    run_contrastive.main(tiny_run_args(tiny_model_dir, out, "--batch_by_image", "true", "--captions_per_image", "0",
                                       "--per_device_train_batch_size", "4", "--topic_batches", "2",
                                       "--topic_share", "0.5", "--resume_from_checkpoint", list_checkpoints(str(out))[0]))
    assert "resumed from" in caplog.text and "topic batches:" not in caplog.text
    resumed = json.loads((Path(list_checkpoints(str(out))[-1]) / "trainer_state.json").read_text())
    assert resumed["topics"] == state["topics"]
    with pytest.raises(SystemExit):  # at parse time, before any caching
        parse_args(tiny_run_args(tiny_model_dir, tmp_path / "random", "--topic_batches", "3"))
    assert "--topic_batches draws whole images by topic: it needs --batch_by_image true" in capsys.readouterr().err


def test_cca_head_init_starts_training_at_the_linear_cca_map_of_the_towers_as_loaded(tmp_path, caplog):
    from accelerate.utils import set_seed

    from dualencoder.cca import fit_cca, project
    from dualencoder.evaluation.embed import pooled_image_features, pooled_text_features, split_captions

    caplog.set_level("INFO")
    text_dir = save_tiny_text_backbone(tmp_path / "text")
    # Every learning rate 0 and BatchNorm statistics frozen: the exported model is the model as initialised.
    args = ["--config", str(REPO / "configs" / "tiny_test.yaml"), "--vision_model", "timm:test_efficientnet",
            "--text_model", text_dir, "--image_size", "32", "--projection_head", "mlp", "--projection_dim", "16",
            "--projection_hidden_dim", "32", "--head_init", "cca", "--head_init_options", "{ridge: 1.0, dims: 8, power: 1.0}",
            "--learning_rate", "0", "--head_learning_rate", "0", "--logit_scale_learning_rate", "0",
            "--freeze_batchnorm", "true", "--num_train_epochs", "1", "--feature_cache_dir", "", "--lora_rank", "0",
            "--output_dir", str(tmp_path / "out")]
    run_contrastive.main(args)
    assert "head_init cca: ridge 1.0, dims 8, power 1.0, pairs " in caplog.text
    model = DualEncoderModel.from_pretrained(tmp_path / "out").eval()
    # The CCA the heads must hold, fitted here on the same towers' pooled features of every training pair.
    model_args, data_args, train_args = parse_args(args)
    train, views = training_data.load_data(data_args, train_args.seed)
    transform = ImageTransform(build_processor(model.config).image_processor, train=False)
    tokenizer = build_processor(model.config).tokenizer
    how = dict(batch_size=16, device="cpu", show_progress=False)

    def pooled(view, captions):
        images = pooled_image_features(model, view, transform, **how)
        texts = pooled_text_features(model, captions, tokenizer, max_length=data_args.max_length, **how)
        return images, texts

    train_images, train_texts = pooled(to_image_view(train), list(train["caption"]))
    fit = fit_cca(torch.stack([train_images[i] for i in train["image_id"]]),
                  torch.stack([train_texts[c] for c in train["caption"]]), 1.0)
    ids, captions, _ = split_captions(views["test"])
    test_images, test_texts = pooled(views["test"], captions)
    x, y = torch.stack([test_images[i] for i in ids]), torch.stack([test_texts[c] for c in captions])
    expected_images, expected_texts = project(fit, x, y, 8, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model.project_image(x)[:, :8], expected_images, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(model.project_text(y)[:, :8], expected_texts, atol=1e-4, rtol=1e-3)
    # The same towers with random heads: the CCA map is what the initialisation changed.
    set_seed(train_args.seed)
    assert not torch.allclose(model_setup.build_model(model_args).project_image(x)[:, :8],
                              expected_images, atol=1e-2)


def test_cca_head_init_options_are_checked_before_any_work(tiny_model_dir, tmp_path, capsys):
    linear = tiny_run_args(tiny_model_dir, tmp_path / "a", "--model_name_or_path", "", "--head_init", "cca",
                           "--projection_head", "linear")
    with pytest.raises(SystemExit):
        parse_args(linear)
    assert "--head_init cca needs --projection_head mlp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(tiny_run_args(tiny_model_dir, tmp_path / "b", "--head_init", "cca", "--projection_head", "mlp"))
    assert "a model from --model_name_or_path keeps its trained ones" in capsys.readouterr().err
    # the shipped Flickr8k config sets head_init: cca; fine-tuning a saved model with it takes --head_init random
    shipped = ["--config", str(REPO / "configs" / "flickr8k_offline.yaml"), "--model_name_or_path", str(tiny_model_dir)]
    with pytest.raises(SystemExit):
        parse_args(shipped)
    assert "pass --head_init random" in capsys.readouterr().err
    assert parse_args(shipped + ["--head_init", "random"])[0].head_init == "random"
    model_args = parse_args(["--head_init", "cca", "--projection_head", "mlp", "--head_init_options", "{dim: 64}"])[0]
    with pytest.raises(SystemExit, match="unknown key.*dim.*expected ridge, dims, power"):
        model_setup.head_init_options(model_args)


def test_flip_augment_caches_the_mirrored_prefix_of_the_training_images_only(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    cache_dir = tmp_path / "features"
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--vision_train", "top:1",
                                                 "--flip_augment", "true", "--feature_cache_dir", str(cache_dir)))
    assert "never are (a caption says left or right)" in caplog.text
    [mirrored] = cache_dir.glob("vision-prefix-mirrored-*.pt")
    [plain] = set(cache_dir.glob("vision-prefix-*.pt")) - {mirrored}
    train_ids = set(training_data.load_data(parse_args(["--dataset", "synthetic", "--num_images", "30"])[1],
                                              seed=42)[0]["image_id"])
    mirrored, plain = torch.load(mirrored), torch.load(plain)
    assert set(mirrored) == train_ids and train_ids < set(plain)
    some = next(iter(train_ids))
    assert not torch.equal(mirrored[some], plain[some])
    assert metrics["test"]["rsum"] > 0


def test_augment_with_a_cached_prefix_crops_the_cached_maps_and_changes_training(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    cache_dir = tmp_path / "features"
    args = ("--vision_train", "top:1", "--text_train", "frozen", "--feature_cache_dir", str(cache_dir),
            "--prefix_cache_dtype", "float32", "--num_train_epochs", "1")
    cropped = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "cropped", *args, "--augment", "true"))
    assert "random resized crops of the cached maps" in caplog.text
    plain = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "plain", *args))
    assert len(list(cache_dir.glob("vision-prefix-*.pt"))) == 1  # one cache serves both: crops are drawn per step
    cropped_weights, plain_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("cropped", "plain"))
    head_conv = next(k for k in cropped_weights if k.startswith("vision_model.conv_head"))
    assert not torch.equal(cropped_weights[head_conv], plain_weights[head_conv])
    assert cropped["test"]["rsum"] > 0 and plain["test"]["rsum"] > 0


def test_image_flip_average_evaluates_on_both_views_from_the_cache_and_reports_the_single_view_too(tiny_model_dir,
                                                                                                    tmp_path):
    cache_dir = tmp_path / "features"
    args = ("--vision_train", "top:1", "--flip_augment", "true", "--feature_cache_dir", str(cache_dir),
            "--prefix_cache_dtype", "float32")
    averaged = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", *args, "--image_flip_average", "true"))
    [mirrored] = cache_dir.glob("vision-prefix-mirrored-*.pt")
    _, eval_views = training_data.load_data(parse_args(["--dataset", "synthetic", "--num_images", "30",
                                                          "--synthetic_image_size", "32"])[1], seed=42)
    # training images to augment + validation images to average over (the test images are read from their files)
    assert len(torch.load(mirrored)) == 30 - len(eval_views["test"])
    assert averaged["test"] != averaged["test_without_flip_average"]
    saved = DualEncoderModel.from_pretrained(tmp_path / "out")
    assert saved.config.image_flip_average  # the published model embeds images the way it was tested
    # The reported test metrics equal embedding the test images from pixels with the saved model.
    processor = build_processor(saved.config)
    from_pixels = embed_split(saved, eval_views["test"], ImageTransform(processor.image_processor), processor.tokenizer,
                              max_length=32, batch_size=16, show_progress=False).metrics()
    assert from_pixels == pytest.approx(averaged["test"], abs=1e-6)


def test_querybank_metrics_use_the_training_split_as_the_bank_and_match_embedding_from_pixels(tiny_model_dir, tmp_path):
    """The reported querybank rows, like the test row, are the saved model's on the image files: the bank and both
    evaluation splits are embedded from the files at the end, not read from the (float16) caches of training."""
    cache_dir = tmp_path / "features"
    args = ("--vision_train", "top:1", "--image_flip_average", "true", "--feature_cache_dir", str(cache_dir),
            "--num_train_epochs", "1", "--querybank_beta", "10")
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", *args))
    train_pairs, eval_views = training_data.load_data(parse_args(["--dataset", "synthetic", "--num_images", "30",
                                                                    "--synthetic_image_size", "32"])[1], seed=42)
    # the caches hold what training and the choice of the best epoch read: no test image, and (no flip_augment)
    # only the validation images mirrored
    [mirrored] = cache_dir.glob("vision-prefix-mirrored-*.pt")
    assert set(torch.load(mirrored)) == set(eval_views["validation"]["image_id"])
    for cached in cache_dir.glob("vision-*.pt"):
        assert not set(torch.load(cached)) & set(eval_views["test"]["image_id"]), cached.name
    assert metrics["querybank"] == {"beta": 10.0, "bank": "train", "images": len(set(train_pairs["image_id"])),
                                    "captions": len(train_pairs), "seconds": metrics["querybank"]["seconds"]}
    # The same numbers as embedding the training and evaluation images from pixels with the saved model.
    saved = DualEncoderModel.from_pretrained(tmp_path / "out")
    processor = build_processor(saved.config)

    def embed(view):
        return embed_split(saved, view, ImageTransform(processor.image_processor), processor.tokenizer, max_length=32,
                           batch_size=16, show_progress=False)

    bank = embed(to_image_view(train_pairs))
    for split in ("validation", "test"):
        assert metrics[f"{split}_querybank"] == pytest.approx(querybank_metrics(embed(eval_views[split]), bank, 10.0),
                                                              abs=1e-6)
    assert metrics["test_querybank"] != metrics["test"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "test, querybank-normalised" in card and "beta 10" in card
    # A smaller bank: the first 4 training images and their captions.
    smaller = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "small", *args, "--querybank_max_images", "4"))
    assert (smaller["querybank"]["images"], smaller["querybank"]["captions"]) == (4, 20)


def test_cached_features_are_reused_only_for_the_same_weights_and_settings(tmp_path):
    from dualencoder.feature_store import load_or_compute, tower_fingerprint

    layer = torch.nn.Linear(3, 2)
    key = tower_fingerprint(layer, 224)
    assert key == tower_fingerprint(layer, 224) != tower_fingerprint(layer, 128)
    calls = []
    path = str(tmp_path / f"vision-{key}.pt")
    first = load_or_compute(path, lambda: calls.append(1) or {"a": torch.ones(2)})
    second = load_or_compute(path, lambda: calls.append(1) or {"a": torch.zeros(2)})
    assert calls == [1] and torch.equal(first["a"], second["a"])
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert tower_fingerprint(layer, 224) != key


def test_a_truncated_cache_file_is_computed_again_not_a_crash(tmp_path, caplog):
    from dualencoder.feature_store import load_or_compute

    path = tmp_path / "vision-abc.pt"
    torch.save({"a": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])  # as a full disk or a killed copy leaves it
    caplog.set_level("WARNING")
    features = load_or_compute(path, lambda: {"a": torch.zeros(2)})
    assert torch.equal(features["a"], torch.zeros(2)) and "unreadable" in caplog.text
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))  # and written again, whole


def test_a_prefix_cache_key_leaves_out_adapters_so_a_run_with_top_block_lora_reuses_the_plain_prefix():
    from dualencoder.feature_store import tower_fingerprint

    torch.manual_seed(0)
    plain = DualEncoderModel(tiny_timm_config())
    torch.manual_seed(0)  # the same backbone weights (drawn before the adapters), plus adapters
    adapted = DualEncoderModel(tiny_timm_config(lora_rank=2, lora_towers=["vision"], lora_vision_blocks=1))
    assert (tower_fingerprint(adapted.vision_model, 224, without_adapters=True)
            == tower_fingerprint(plain.vision_model, 224, without_adapters=True))
    assert tower_fingerprint(adapted.vision_model, 224) != tower_fingerprint(plain.vision_model, 224)


def test_a_nan_loss_stops_the_run_naming_the_step_and_saves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from dualencoder import losses

    monkeypatch.setattr(losses.ClipLoss, "forward", lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingDiverged, match="step 1"):
        run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--eval_before_training", "false"))
    assert list_checkpoints(str(tmp_path / "out")) == []


def test_resume_latest_ignores_a_half_written_checkpoint(tmp_path):
    from safetensors.torch import save_file

    complete = tmp_path / "checkpoints" / "checkpoint-4"
    complete.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, complete / "model.safetensors")
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.save({}, complete / name)
    (complete / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-6.tmp").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "checkpoint-8").mkdir()  # renamed but without its state file
    assert resolve_resume(str(tmp_path), "latest") == str(complete)
    assert resolve_resume(str(tmp_path / "nothing-here"), "latest") is None
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), str(tmp_path / "checkpoints" / "checkpoint-8"))


def test_an_export_moves_in_whole_with_metrics_json_last(tmp_path):
    staging, out = tmp_path / "out" / ".export.tmp", tmp_path / "out"
    (staging / "adapters").mkdir(parents=True)
    for name in ("model.safetensors", "metrics.json", "README.md", "adapters/adapter.bin"):
        (staging / name).write_text("new")
    (out / "adapters").joinpath("stale.bin").parent.mkdir(exist_ok=True)
    (out / "adapters" / "stale.bin").write_text("old")  # an earlier export's adapters are replaced, not merged
    moved = []
    real_replace = os.replace
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", lambda a, b: moved.append(os.path.basename(b)) or real_replace(a, b))
        move_into(str(staging), str(out), last="metrics.json")
    assert moved[-1] == "metrics.json" and len(moved) == 4
    assert sorted(os.listdir(out)) == ["README.md", "adapters", "metrics.json", "model.safetensors"]
    assert os.listdir(out / "adapters") == ["adapter.bin"]


def test_a_swap_cut_in_half_by_a_crash_gets_its_previous_version_back(tmp_path):
    best = tmp_path / "best"
    (tmp_path / "best.old").mkdir()  # killed between renaming best -> best.old and best.tmp -> best
    (tmp_path / "best.old" / "model.safetensors").write_text("epoch 2")
    recover_swap(str(best))
    assert (best / "model.safetensors").read_text() == "epoch 2" and not (tmp_path / "best.old").exists()
    recover_swap(str(best))  # nothing to recover: a no-op
    write_atomically(str(best), lambda d: (Path(d) / "model.safetensors").write_text("epoch 3"))
    assert (best / "model.safetensors").read_text() == "epoch 3" and sorted(os.listdir(tmp_path)) == ["best"]


# Run in a child process: run_contrastive.main(argv), SIGKILLed by itself the moment checkpoint-<step> is
# complete. A kill from outside, timed by polling for the checkpoint, raced the run: under load the run
# could write later checkpoints, or finish, before the kill landed.
_KILL_AFTER_CHECKPOINT = """
import json, os, signal, sys
import run_contrastive
argv, step_to_die_after = json.loads(sys.argv[1]), int(sys.argv[2])
save_checkpoint = run_contrastive.save_checkpoint
def save_then_die(accelerator, output_dir, step, *args, **kwargs):
    path = save_checkpoint(accelerator, output_dir, step, *args, **kwargs)
    if step == step_to_die_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
run_contrastive.save_checkpoint = save_then_die
run_contrastive.main(argv)
"""


def test_each_epoch_draws_new_batches(tiny_model_dir, tmp_path, monkeypatch):
    """The prepared loader would reset its sampler to epoch 0 each epoch; the run sets the real epoch."""
    seen = []

    class Recording(training_data.ContrastiveCollator):
        def __call__(self, rows):
            seen.append(tuple(row["image_id"] for row in rows))
            return super().__call__(rows)

    monkeypatch.setattr(training_data, "ContrastiveCollator", Recording)
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--eval_before_training", "false"))
    per_epoch = metrics["global_step"] // 2
    assert len(seen) == 2 * per_epoch
    assert seen[:per_epoch] != seen[per_epoch:]  # epoch 1 is not a replay of epoch 0
    assert sorted(seen[:per_epoch]) != sorted(seen[per_epoch:])  # other groupings of images, not just another order


@pytest.mark.parametrize("kill_after, epoch, options", [(2, 0, ()), (18, 1, ("--augment", "true"))],
                         ids=["epoch-0", "epoch-1-augment"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_result(tiny_model_dir, tmp_path, kill_after, epoch, options):
    """kill -9 right after a mid-epoch checkpoint, resume from 'latest', compare with an uninterrupted run
    (the random resized crops too: they are drawn per image and epoch, not from the global RNG)."""
    extra = ("--checkpointing_steps", "2", "--save_total_limit", "20", "--eval_before_training", "false", *options)
    reference = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "reference", *extra))

    interrupted = tmp_path / "interrupted"
    argv = tiny_run_args(tiny_model_dir, interrupted, *extra)
    # Same thread count as this process, so both runs sum in the same order.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, json.dumps(argv), str(kill_after)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = list_checkpoints(str(interrupted))
    assert Path(checkpoints[-1]).name == f"checkpoint-{kill_after}"
    state = json.loads((Path(checkpoints[-1]) / "trainer_state.json").read_text())
    assert state["epoch"] == epoch and state["step_in_epoch"] > 0, "the checkpoint should fall inside that epoch"
    assert not (interrupted / "metrics.json").exists()

    resumed = run_contrastive.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["global_step"] == reference["global_step"]
    # The training time adds the interrupted run's (up to its checkpoint) to the resumed run's.
    assert reference["resumed_from"] is None and resumed["resumed_from"] == checkpoints[-1]
    assert resumed["train_seconds"] > state["train_seconds"] > 0
    assert resumed["test"] == pytest.approx(reference["test"])
    final_reference = load_file(tmp_path / "reference" / "model.safetensors")
    final_resumed = load_file(interrupted / "model.safetensors")
    for key in final_reference:
        # Float noise is ~1e-5 here; a resume that replays or skips a batch moves weights by ~1e-2.
        torch.testing.assert_close(final_resumed[key], final_reference[key], atol=1e-4, rtol=1e-3)


def test_two_cpu_processes_split_the_batches_and_save_both_rng_states(tiny_model_dir, tmp_path):
    """torchrun with 2 gloo processes: each sees half the batches; checkpoints hold both RNG states."""
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "run_contrastive.py", *tiny_run_args(tiny_model_dir, out, "--eval_before_training", "false")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    train_rows = 24 * 5  # 30 synthetic images -> 24 train images x 5 captions
    batches_per_epoch = -(-train_rows // 8)
    assert metrics["global_step"] == 2 * -(-batches_per_epoch // 2)
    last = Path(list_checkpoints(str(out))[-1])
    assert (last / "random_states_0.pkl").exists() and (last / "random_states_1.pkl").exists()
    # the cosine schedule spans the whole run under 2 processes too (Accelerate steps it once per process)
    history = json.loads((out / "log_history.json").read_text())
    lrs = {row["step"]: row["lr"] for row in history if "lr" in row}
    assert len(lrs) == metrics["global_step"]
    assert all(lr > 0 for step, lr in lrs.items() if step < metrics["global_step"])
    peak = max(lrs.values())
    assert 0.3 * peak < lrs[metrics["global_step"] // 2] < 0.7 * peak  # about half-way down the cosine at mid-run


def test_a_new_run_in_an_output_dir_with_checkpoints_is_refused_unless_asked_to_resume_or_overwrite(tiny_model_dir,
                                                                                                   tmp_path):
    out = tmp_path / "out"
    args = tiny_run_args(tiny_model_dir, out, "--num_train_epochs", "1", "--eval_before_training", "false")
    run_contrastive.main(args)
    earlier = list_checkpoints(str(out))
    assert earlier
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(args)
    message = str(refused.value)
    assert str(out) in message and "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert list_checkpoints(str(out)) == earlier  # nothing was touched
    run_contrastive.main([*args, "--overwrite_output_dir", "true"])  # starts over: same steps, new files
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == [os.path.basename(p) for p in earlier]


def test_new_model_options_a_saved_model_would_ignore_are_refused_naming_them(tiny_model_dir, tmp_path):
    """(Every such option: tests/test_model_setup.py.) The loss is not part of a model, so it is not refused."""
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--loss", "siglip", "--projection_dim", "64"))
    message = str(refused.value)
    assert "--loss" not in message
    assert "--projection_dim 64 (the model has projection_dim=16)" in message and "build a new model" in message


@pytest.mark.parametrize("source", ["imagefolder", "train_file"])
def test_your_own_images_and_captions_train_end_to_end_from_the_command_line(tiny_model_dir, tmp_path, source):
    """An imagefolder (metadata.csv of file_name,text) as --dataset, or a CSV as --train_file with named columns:
    two captions of each image are positives of one another, the missing splits are carved, the run exports."""
    from tests.test_data_sources import captions, imagefolder, write_csv, write_image

    if source == "imagefolder":
        extra = ("--dataset", str(imagefolder(tmp_path / "mine", n=16)))
    else:
        for i in range(16):
            write_image(tmp_path / "photos" / f"{i}.png", i)
        table = write_csv(tmp_path / "pairs.csv", ["path", "description"],
                          [[f"photos/{i}.png", c] for i in range(16) for c in captions(i)])
        extra = ("--train_file", str(table), "--image_column", "path", "--caption_column", "description")
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", *extra, "--num_train_epochs", "1"))
    assert metrics["test"]["rsum"] > 0 and metrics["global_step"] > 0
    saved = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert saved["train_file" if source == "train_file" else "dataset"] == extra[1]


def test_a_data_file_without_the_named_columns_is_one_error_line_naming_the_file_and_the_columns(tiny_model_dir,
                                                                                                 tmp_path):
    from tests.test_data_sources import write_csv

    table = write_csv(tmp_path / "pairs.csv", ["photo", "description"], [["a.png", "a red square"]])
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--train_file", str(table)))
    message = str(refused.value)
    assert message.startswith(f"error: {table}: no image column") and "['photo', 'description']" in message
    assert "\n" not in message


def test_a_run_killed_right_after_the_checkpoint_of_its_last_step_still_ends_its_last_epoch(tiny_model_dir, tmp_path):
    """A periodic checkpoint at the final step holds the last epoch unfinished (its validation, best-model choice
    and end checkpoint not yet done). Resumed from it, the run must end that epoch, not skip it: the same best
    epoch, validation and test as an uninterrupted run (issue 30's first silently-wrong case)."""
    extra = ("--eval_before_training", "false", "--save_total_limit", "20")
    reference = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "reference", *extra))
    total = reference["global_step"]
    interrupted = tmp_path / "interrupted"
    argv = tiny_run_args(tiny_model_dir, interrupted, *extra, "--checkpointing_steps", str(total))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, json.dumps(argv), str(total)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((interrupted / "checkpoints" / f"checkpoint-{total}" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (total, 1, total // 2)

    resumed = run_contrastive.main(argv + ["--resume_from_checkpoint", "latest"])
    history = json.loads((interrupted / "log_history.json").read_text())
    assert [record["epoch"] for record in history if "rsum" in record] == [1, 2]  # the last epoch was validated
    assert resumed["best_epoch"] == reference["best_epoch"] and resumed["global_step"] == total
    assert resumed["validation"] == pytest.approx(reference["validation"])
    assert resumed["test"] == pytest.approx(reference["test"])


def test_a_resume_with_other_options_or_data_is_refused_naming_the_differences(tiny_model_dir, tmp_path, caplog):
    """A checkpoint records the options and data it was trained with; resuming it with a different learning rate
    or data set would not continue that run (it was accepted before, global step 63 of 39)."""
    out = tmp_path / "out"
    argv = tiny_run_args(tiny_model_dir, out, "--eval_before_training", "false", "--num_train_epochs", "1")
    run_contrastive.main(argv)
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(argv + ["--resume_from_checkpoint", "latest", "--learning_rate", "0.5",
                                     "--num_images", "40"])
    message = str(refused.value)
    assert "learning_rate: 2e-05 -> 0.5" in message and "num_images: 30 -> 40" in message and "train_pairs" in message
    caplog.set_level("WARNING")
    run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "fresh", "--eval_before_training", "false",
                                       "--num_train_epochs", "1", "--resume_from_checkpoint", "latest"))
    assert "no complete checkpoint in" in caplog.text and "new run" in caplog.text


_SIGNAL_AFTER_STEP = """
import json, os, signal, sys
from dualencoder.training import step
argv, signal_name, after = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
call = step.TrainStep.__call__
def call_then_signal(self, batch):
    loss = call(self, batch)
    if self.global_step == after:
        os.kill(os.getpid(), getattr(signal, signal_name))  # as a scheduler's pre-emption or a Ctrl-C would
    return loss
step.TrainStep.__call__ = call_then_signal
import run_contrastive
run_contrastive.main(argv)
"""


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_checkpoint_exits_with_its_code_and_the_resumed_run_is_exact(tiny_model_dir, tmp_path,
                                                                                       signal_name, code):
    """SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) used to end the run with nothing saved; now the step in
    flight finishes, a checkpoint is written, the process exits with the shell's code for the signal, and resuming
    gives an uninterrupted run's result."""
    extra = ("--eval_before_training", "false", "--save_total_limit", "20")
    reference = run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "reference", *extra))
    stopped = tmp_path / "stopped"
    argv = tiny_run_args(tiny_model_dir, stopped, *extra)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_STEP, json.dumps(argv), signal_name, "3"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == code, result.stderr[-3000:]
    assert f"stopped by {signal_name} after step 3" in result.stdout + result.stderr
    assert [Path(path).name for path in list_checkpoints(str(stopped))] == ["checkpoint-3"]
    resumed = run_contrastive.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["global_step"] == reference["global_step"]
    assert resumed["test"] == pytest.approx(reference["test"])


def test_when_no_epoch_beats_the_model_before_training_that_model_is_exported_and_the_log_says_so(tiny_model_dir,
                                                                                                 tmp_path, caplog):
    """The state before training is the first best-model candidate (it was never one: a run whose training only
    hurt exported its least bad epoch). A head learning rate of 1 wrecks the heads of the tiny model."""
    caplog.set_level("WARNING")
    out = tmp_path / "out"
    metrics = run_contrastive.main(tiny_run_args(tiny_model_dir, out, "--eval_before_training", "true", "--vision_train",
                                                 "frozen", "--text_train", "frozen", "--head_learning_rate", "1"))
    history = json.loads((out / "log_history.json").read_text())
    epochs = [record["rsum"] for record in history if "rsum" in record]
    assert len(epochs) == 2 and max(epochs) < metrics["before_training"]["rsum"], "training should have hurt here"
    assert metrics["best_epoch"] == 0 and metrics["validation"] == metrics["before_training"]
    assert "no epoch beat the model as it was before training" in caplog.text
    exported, untrained = load_file(out / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    for key in untrained:
        torch.testing.assert_close(exported[key], untrained[key], msg=key)


def test_an_evaluation_split_whose_every_image_was_skipped_is_one_error_line_naming_it(tiny_model_dir, tmp_path):
    """It was a traceback from the first evaluation (torch.cat(): expected a non-empty list of Tensors)."""
    from tests.test_data_sources import captions, write_csv, write_image

    for i in range(12):
        write_image(tmp_path / f"{i}.png", i)
    for i in (12, 13):
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    tables = {name: write_csv(tmp_path / f"{name}.csv", ["file_name", "text"],
                              [[f"{i}.png", c] for i in images for c in captions(i)])
              for name, images in (("train", range(12)), ("dev", (12, 13)))}
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(tiny_run_args(tiny_model_dir, tmp_path / "out", "--train_file", str(tables["train"]),
                                           "--validation_file", str(tables["dev"]), "--on_bad_image", "skip"))
    message = str(refused.value)
    assert message.startswith(f"error: the validation split ({tables['dev']}) has no images left") and "\n" not in message


def test_the_reported_test_scores_are_the_saved_models_on_the_image_files(tiny_model_dir, tmp_path):
    """Training reads a 16 px pixel store (the images are 48 px) and a float16 prefix cache; the reported test
    metrics were computed from them, not from what the export computes on the files. Now they are the export's,
    as the evaluation command (and a user) embeds the test split."""
    import numpy as np
    from PIL import Image

    from dualencoder.evaluation import common
    from tests.test_data_sources import captions, write_csv

    generator = np.random.default_rng(0)
    for i in range(40):  # textured, so a smaller stored copy loses detail
        Image.fromarray(generator.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], [[f"{i}.png", c] for i in range(40) for c in captions(i)])
    out = tmp_path / "out"
    run_contrastive.main(tiny_run_args(tiny_model_dir, out, "--dataset", str(tmp_path), "--vision_train", "top:1",
                                       "--prefix_cache_dtype", "float16", "--pixel_store_size", "16",
                                       "--num_train_epochs", "1"))
    reported = json.loads((out / "metrics.json").read_text())["test"]
    model, processor = common.load_model(str(out), device="cpu")
    options = common.data_options(str(out), dataset=str(tmp_path))
    embedded = common.embed(model, processor, common.load_split(**options), max_length=options["max_length"])
    assert embedded.metrics() == pytest.approx(reported, abs=1e-6)


def test_a_run_resumed_from_an_older_checkpoint_exports_that_checkpoints_best_model_not_a_later_one(tiny_model_dir,
                                                                                                 tmp_path, monkeypatch):
    """The best model lived in one folder that every new best overwrote: resumed from epoch 1's checkpoint after
    epoch 2 had saved a better model, a run whose replayed epoch 2 scores worse (another machine's arithmetic;
    forced here) exported the abandoned epoch 2's model under epoch 1's metrics. Each best model is now kept
    under its step for as long as a checkpoint names it."""
    out = tmp_path / "out"
    argv = tiny_run_args(tiny_model_dir, out, "--save_total_limit", "20")
    end_of_epoch = run_contrastive.end_of_epoch

    def scored(rsum_of_epoch):
        def end(state, results, *args):
            end_of_epoch(state, {**results, "rsum": rsum_of_epoch[state["epoch"]]}, *args)
        return end

    monkeypatch.setattr(run_contrastive, "end_of_epoch", scored({0: 100.0, 1: 200.0}))  # epoch 2 is the best
    first = run_contrastive.main(argv)
    assert first["best_epoch"] == 2
    epoch_one = list_checkpoints(str(out))[0]
    monkeypatch.setattr(run_contrastive, "end_of_epoch", scored({0: 100.0, 1: 50.0}))  # replayed, it is worse
    resumed = run_contrastive.main(argv + ["--resume_from_checkpoint", epoch_one])
    assert resumed["best_epoch"] == 1 and resumed["validation"]["rsum"] == 100.0
    at_epoch_one = load_file(Path(epoch_one) / "model.safetensors")  # the trained weights as epoch 1 ended
    exported = load_file(out / "model.safetensors")
    for key in at_epoch_one:
        torch.testing.assert_close(exported[key], at_epoch_one[key], msg=key)
