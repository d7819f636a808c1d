"""The evaluation commands (evaluate, figures, report) on a tiny random model and a tiny synthetic set,
and the report's pair selection on hand-built embeddings."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits
from transformers import DistilBertConfig, ViTImageProcessor
from transformers import VisionTextDualEncoderProcessor

from dualencoder.evaluation import common, evaluate_model, figures, report
from dualencoder.evaluation.embed import EmbeddedSplit
from dualencoder.metrics import retrieval_metrics
from dualencoder.processing import load_tokenizer
from dualencoder.querybank import querybank_metrics
from modeling_dualencoder import DualEncoderModel
from tests.tiny import save_tiny_text_backbone, tiny_vit_distilbert_config

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum"}
# 24 generated 32x32 scenes; the first 10 training images are 10 images and 50 captions.
DATA = ["--dataset", "synthetic", "--num_images", "24", "--synthetic_image_size", "32",
        "--split", "train", "--max_images", "10", "--quiet"]


def minilm_tokenizer():
    """The MiniLM tokenizer shipped in the offline package (BERT uncased vocabulary, 30522 tokens)."""
    return load_tokenizer("offline:all-minilm-l6-v2")


def tiny_text_config():
    return DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                            max_position_embeddings=64)


def make_tiny_model_dir(path, seed: int = 0) -> Path:
    """A run directory as `run_contrastive.py` leaves it, at toy size: a random ViT + DistilBERT dual
    encoder, its processor (32x32 images, the MiniLM tokenizer) and a log_history.json."""
    path = Path(path)
    torch.manual_seed(seed)
    model = DualEncoderModel(tiny_vit_distilbert_config(text_config=tiny_text_config().to_dict()))
    model.save_pretrained(path)
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=minilm_tokenizer()).save_pretrained(path)
    log = [{"step": step, "epoch": 0, "loss": 3.0 / step, "logit_scale": 14.3 + 0.01 * step, "lr": 1e-3 / step}
           for step in (1, 2, 3, 4)]
    log.append({"step": 4, "epoch": 1, "i2t_r1": 20.0, "t2i_r1": 30.0, "rsum": 250.0})
    (path / "log_history.json").write_text(json.dumps(log))
    return path


@pytest.fixture(scope="module", autouse=True)
def offline_and_private_cache(tmp_path_factory):
    # One BLAS/OpenMP thread: on a shared, busy machine t-SNE's OpenMP threads otherwise spin-wait
    # (a 60-point t-SNE took 20 s instead of 0.5 s).
    with pytest.MonkeyPatch.context() as patch, threadpool_limits(limits=1):
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("DUALENCODER_CACHE", str(tmp_path_factory.mktemp("dualencoder-cache")))
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="module")
def zero_shot_args(tmp_path_factory):
    text = save_tiny_text_backbone(tmp_path_factory.mktemp("tiny-text"))
    return ["--vision_model", "timm:test_efficientnet", "--text_model", str(text)]


def png_width(path) -> int:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size[0]


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_writes_json_and_prints_a_table(model_dir, tmp_path, capsys):
    out = tmp_path / "eval" / "test.json"
    result = evaluate_model.main(["--model_dir", str(model_dir), *DATA, "--output_json", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"dataset", "split", "num_images", "num_captions", "data_options", "results"} <= set(saved)
    sizes = (saved["dataset"], saved["split"], saved["num_images"], saved["num_captions"])
    assert sizes == ("synthetic", "train", 10, 50)
    assert list(saved["results"]) == ["model"]
    run = saved["results"]["model"]
    assert run["name"] == str(model_dir)
    assert set(run["metrics"]) == METRIC_KEYS
    assert set(run["similarity"]) == {"pos_mean", "neg_mean", "gap"}
    assert "| run | I→T R@1" in printed and f"| {model_dir} |" in printed

    # the same numbers as embedding the split by hand through the shared code path
    model, processor = common.load_model(str(model_dir))
    view = common.load_split("synthetic", "train", 10, num_images=24, synthetic_image_size=32)
    embedded = common.embed(model, processor, view, show_progress=False)
    expected = retrieval_metrics(embedded.image_embeds, embedded.text_embeds, embedded.text_to_image)
    assert run["metrics"] == pytest.approx(expected)


def test_querybank_rows_score_the_split_against_another_splits_queries(model_dir, capsys):
    args = ["--model_dir", str(model_dir), "--dataset", "synthetic", "--num_images", "24",
            "--synthetic_image_size", "32", "--split", "test"]
    result = evaluate_model.main([*args, "--querybank_split", "train", "--querybank_beta", "5", "20"])
    bank = result["results"]["model"]["querybank"]
    assert (bank["split"], list(bank["metrics"])) == ("train", ["5", "20"])
    printed = capsys.readouterr().out
    assert f"| {model_dir}, querybank train beta 5 |" in printed and "querybank train beta 20 |" in printed
    # The same numbers as QB-Norm over the two splits embedded by hand.
    model, processor = common.load_model(str(model_dir))
    embedded, bank_split = (common.embed(model, processor, common.load_split(
        "synthetic", split, num_images=24, synthetic_image_size=32), show_progress=False) for split in ("test", "train"))
    assert bank["images"] == len(bank_split.image_ids) and bank["captions"] == len(bank_split.captions)
    for beta in (5.0, 20.0):
        assert bank["metrics"][f"{beta:g}"] == pytest.approx(querybank_metrics(embedded, bank_split, beta))
    smaller = evaluate_model.main([*args, "--querybank_split", "train", "--querybank_max_images", "5"])
    assert smaller["results"]["model"]["querybank"]["images"] == 5 < bank["images"]
    with pytest.raises(SystemExit, match="--querybank_split test is the evaluated split"):
        evaluate_model.main([*args, "--querybank_split", "test"])


def test_untrained_alone_and_beside_the_model(model_dir, zero_shot_args, capsys):
    alone = evaluate_model.main(["--untrained", *zero_shot_args, *DATA])
    assert list(alone["results"]) == ["untrained"]
    assert set(alone["results"]["untrained"]["metrics"]) == METRIC_KEYS
    assert "timm:test_efficientnet" in alone["results"]["untrained"]["name"]

    both = evaluate_model.main(["--model_dir", str(model_dir), "--untrained", *zero_shot_args, *DATA])
    assert list(both["results"]) == ["model", "untrained"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| untrained")]
    assert len(table) == 2  # one row in each printed table


def test_zero_shot_is_a_deprecated_name_of_untrained():
    with pytest.warns(FutureWarning, match="--zero_shot is deprecated, use --untrained"):
        args = evaluate_model.build_parser().parse_args(["--zero_shot"])
    assert args.untrained is True
    assert evaluate_model.build_parser().parse_args([]).untrained is False


def test_zero_shot_backbones_default_to_the_models_then_the_offline_pair():
    assert evaluate_model.zero_shot_backbones(None) == ("offline:efficientnet-lite0", "offline:all-minilm-l6-v2")
    config = SimpleNamespace(vision_model_name_or_path="timm:x", text_model_name_or_path="bert")
    assert evaluate_model.zero_shot_backbones(config) == ("timm:x", "bert")
    assert evaluate_model.zero_shot_backbones(config, text_model="other") == ("timm:x", "other")


def test_nothing_to_evaluate_is_an_error():
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        evaluate_model.main(DATA)


def test_a_model_dir_without_a_saved_model_is_named_before_any_data_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_model, "load_split", lambda **_: pytest.fail("data loaded before the model was checked"))
    (tmp_path / "checkpoints" / "best-12").mkdir(parents=True)  # where a run keeps its best model while it trains
    with pytest.raises(SystemExit, match=f"--model_dir {tmp_path}: no config.json there.*{tmp_path / 'checkpoints' / 'best-12'}"):
        evaluate_model.main(["--model_dir", str(tmp_path)])



def test_an_empty_split_is_one_error_line_naming_it_not_a_traceback(model_dir, tmp_path):
    """An imagefolder whose test/metadata.csv has no rows: evaluating it ended in torch.cat of no batches."""
    from tests.test_data_sources import captions, write_csv, write_image

    for i in range(6):
        write_image(tmp_path / "train" / f"{i}.png", i)
    write_csv(tmp_path / "train" / "metadata.csv", ["file_name", "text"],
              [[f"{i}.png", c] for i in range(6) for c in captions(i)])
    (tmp_path / "test").mkdir()
    write_csv(tmp_path / "test" / "metadata.csv", ["file_name", "text"], [])
    with pytest.raises(SystemExit) as refused:
        evaluate_model.main(["--model_dir", str(model_dir), "--dataset", str(tmp_path), "--quiet"])
    assert str(refused.value).startswith(f"error: the test split ({tmp_path}) has no images left")
    assert "\n" not in str(refused.value)
    # the other splits of the same folder still evaluate
    assert evaluate_model.main(["--model_dir", str(model_dir), "--dataset", str(tmp_path), "--split", "train",
                                "--quiet"])["num_images"] == 5


def test_a_run_trained_on_its_own_tables_is_evaluated_on_their_test_table_by_default(model_dir, tmp_path):
    """It was evaluated on the synthetic set (the --dataset default) without a word; now the run's data, files and
    columns come from its training_args.json, as num_images does for the synthetic set."""
    import shutil

    from tests.test_data_sources import captions, write_csv, write_image

    for i in range(9):
        write_image(tmp_path / "pics" / f"p{i}.jpg", i)
    tables = tmp_path / "tables"
    tables.mkdir()
    for name, rows in (("train.csv", range(0, 5)), ("val.csv", range(5, 7)), ("test.csv", range(7, 9))):
        write_csv(tables / name, ["id", "path", "description"],
                  [[f"row{i}", f"../pics/p{i}.jpg", c] for i in rows for c in captions(i)])
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    (run / "training_args.json").write_text(json.dumps(
        {"dataset": str(tables), "train_file": "train.csv", "validation_file": "val.csv", "test_file": "test.csv",
         "image_column": "path", "caption_column": "description", "max_length": 16, "seed": 42}))
    result = evaluate_model.main(["--model_dir", str(run), "--quiet"])
    assert (result["dataset"], result["num_images"], result["num_captions"]) == (str(tables), 2, 4)
    assert result["data_options"]["test_file"] == "test.csv" and result["data_options"]["image_column"] == "path"
    assert evaluate_model.main(["--model_dir", str(run), "--split", "validation", "--quiet"])["num_images"] == 2
    # another data set given: none of the run's files or columns are carried over to it
    other = common.data_options(str(run), dataset="synthetic")
    assert other["test_file"] is None and other["image_column"] is None and other["max_length"] == 16

def test_data_options_come_from_the_runs_training_args_json_not_from_its_card(tmp_path):
    (tmp_path / "README.md").write_text(
        "# card\n\n## Training options\n\n```yaml\ndataset: synthetic\nnum_images: 999\n```\n")
    (tmp_path / "training_args.json").write_text(json.dumps(
        {"dataset": "synthetic", "max_length": 16, "num_images": 60, "seed": 7, "synthetic_image_size": 32}))
    options = common.data_options(str(tmp_path))
    picked = (options["num_images"], options["synthetic_image_size"], options["seed"], options["max_length"])
    assert picked == (60, 32, 7, 16)
    assert common.data_options(str(tmp_path), num_images=30)["num_images"] == 30
    other = common.data_options(str(tmp_path), dataset="some/hub-set")
    assert other["num_images"] == common.DEFAULT_NUM_IMAGES and other["max_length"] == 16
    assert common.data_options(None)["num_images"] == common.DEFAULT_NUM_IMAGES
    for best in (tmp_path / "checkpoints" / "best-12", tmp_path / "best"):  # this layout, and the one before it
        best.mkdir(parents=True)  # a run's best model has no options file of its own: the run's is read
        assert common.data_options(str(best))["num_images"] == 60


def test_a_synthetic_split_whose_num_images_is_unknown_is_evaluated_with_a_warning(tmp_path, caplog):
    caplog.set_level("WARNING")
    assert common.data_options("someone/hub-model")["num_images"] == common.DEFAULT_NUM_IMAGES
    assert "someone/hub-model records no num_images" in caplog.text and "--num_images" in caplog.text
    caplog.clear()
    common.data_options("someone/hub-model", num_images=400)  # given: nothing to warn about
    common.data_options("someone/hub-model", dataset=str(tmp_path))  # not the synthetic set
    assert caplog.text == ""


def test_help_lists_the_options(capsys):
    # as documented: `python -m dualencoder.evaluation.evaluate_model --help`, from the repository root
    done = subprocess.run([sys.executable, "-m", "dualencoder.evaluation.evaluate_model", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--model_dir", "--zero_shot", "--dataset", "--split", "--max_images", "--output_json"):
        assert option in done.stdout
    for module, options in ((figures, ("--model_dir", "--out", "--no_baseline")),
                            (report, ("--model_dir", "--out", "--num_pairs", "--num_confused"))):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        assert all(option in text for option in options)


# --------------------------------------------------------------------------------------- report
def unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


def hand_built_split() -> EmbeddedSplit:
    """3 images (axes), 7 captions: caption 1 of image 0 ranks image 1 first, captions 5 and 6 of
    image 2 rank image 0 first, caption 3 of image 1 ranks image 0 first."""
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = unit([1, 0, 0], [0.3, 1, 0],  # image 0: exact, then closer to image 1
                 [0, 1, 0.05], [1, 0.8, 0],  # image 1: near exact, then closer to image 0
                 [0.1, 0, 1], [1, 0, 0.5], [1, 0, 0.6])  # image 2: near exact, then twice closer to image 0
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    return EmbeddedSplit(images, texts, text_to_image, ["a", "b", "c"], [f"caption {j}" for j in range(7)])


def test_best_and_worst_pairs_take_one_pair_per_image():
    best, worst = report.aligned_pairs(hand_built_split(), num_pairs=2)
    assert [(p.image_id, p.caption_index) for p in best] == [("a", 0), ("b", 2)]
    assert [(p.image_id, p.caption_index) for p in worst] == [("a", 1), ("c", 5)]
    assert best[0].similarity == pytest.approx(1.0) and best[0].rank == 1
    assert worst[0].rank == 2  # caption 1 ranks image 1 above its own
    every = report.aligned_pairs(hand_built_split(), num_pairs=10, one_per_image=False)[0]
    assert len(every) == 7


def test_confused_pairs_count_both_directions():
    confused = report.confused_image_pairs(hand_built_split(), num_pairs=5)
    found = [(p.id_a, p.id_b, p.a_to_b, p.b_to_a) for p in confused]
    # a -> b once and b -> a once; c -> a twice. Same total: the mutual confusion comes first, and a
    # pair is oriented with its larger count first.
    assert found == [("a", "b", 1, 1), ("c", "a", 2, 0)]
    assert [p.count for p in confused] == [2, 2]
    examples = (confused[0].example_a, confused[0].example_b, confused[1].example_a)
    assert examples == ("caption 1", "caption 3", "caption 5")
    assert report.confused_image_pairs(hand_built_split(), num_pairs=1) == confused[:1]


def test_report_command_writes_markdown_and_grids(model_dir, tmp_path):
    out = tmp_path / "report"
    result = report.main(["--model_dir", str(model_dir), *DATA, "--out", str(out), "--num_pairs", "3",
                          "--num_confused", "2"])
    assert len(result["best"]) == 3 and len(result["worst"]) == 3 and len(result["confused"]) <= 2
    markdown = (out / "report.md").read_text()
    sections = markdown.split("\n## ")
    best = next(s for s in sections if s.startswith("Best-aligned"))
    worst = next(s for s in sections if s.startswith("Worst-aligned"))
    for section in (best, worst):
        rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == 3
    assert "![best-aligned pairs](best_pairs.png)" in markdown and "![worst-aligned pairs](worst_pairs.png)" in markdown
    assert png_width(out / "best_pairs.png") == png_width(out / "worst_pairs.png") == 750  # 3 tiles of 2.5 in
    if result["confused"]:
        assert "(confused_pairs.png)" in markdown
        assert png_width(out / "confused_pairs.png") == 500 * len(result["confused"])  # two pairs per row
    assert "| run | I→T R@1" in markdown


def test_report_with_nothing_confused(tmp_path):
    split = hand_built_split()
    split.text_embeds = split.image_embeds[split.text_to_image]  # every caption is its image
    images = [Image.new("RGB", (20, 20), color) for color in ("red", "green", "blue")]
    result = report.write_report(split, images, tmp_path, num_pairs=2)
    assert result["confused"] == [] and not (tmp_path / "confused_pairs.png").exists()
    assert "nothing is confused" in (tmp_path / "report.md").read_text()


# -------------------------------------------------------------------------------------- figures
def test_figures_command_writes_every_png(model_dir, zero_shot_args, tmp_path):
    out = tmp_path / "figures"
    result = figures.main(["--model_dir", str(model_dir), *DATA, *zero_shot_args, "--out", str(out),
                           "--num_queries", "3", "--k", "4"])
    expected = {"tsne_before_after", "pca_before_after", "text_to_image", "image_to_text", "similarity_histogram",
                "similarity_histogram_before", "training_curves"}
    assert set(result["paths"]) == expected
    for name in expected:
        png_width(out / f"{name}.png")
    assert isinstance(result["gap"], float) and isinstance(result["gap_before"], float)


def test_figures_without_baseline_or_log(model_dir, tmp_path):
    bare = tmp_path / "bare-run"
    bare.mkdir()
    for name in os.listdir(model_dir):
        if name != "log_history.json":
            (bare / name).write_bytes((model_dir / name).read_bytes())
    result = figures.main(["--model_dir", str(bare), *DATA, "--no_baseline", "--out", str(tmp_path / "figs")])
    assert set(result["paths"]) == {"tsne", "pca", "text_to_image", "image_to_text", "similarity_histogram"}
    assert "gap_before" not in result
