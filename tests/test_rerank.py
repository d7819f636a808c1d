"""The co-attention re-ranker (dualencoder/rerank/): the model, hard-negative mining, top-k re-ranking, saving
with the dual encoder, the training command and `evaluate --rerank_top_k`; tiny towers and tiny data."""

import json
import shutil
import time

import pytest
import torch
from threadpoolctl import threadpool_limits

from dualencoder.evaluation import evaluate_model
from backbones_dualencoder import tower_blocks
from dualencoder.evaluation.common import embed, load_split
from dualencoder.evaluation.embed import EmbeddedSplit
from dualencoder.processing import build_processor
from dualencoder.rerank import train as rerank_train
from dualencoder.rerank.features import SplitTokens, split_features
from dualencoder.rerank.mining import draw_groups, draw_negatives, mine_hard_negatives
from dualencoder.rerank.model import CoAttentionReranker, RerankerConfig, load_reranker, save_reranker
from dualencoder.rerank.rerank import rerank_top_k, reranked_metrics
from modeling_dualencoder import DualEncoderConfig, DualEncoderModel
from tests.tiny import save_tiny_model_dir

TINY = dict(text_dim=8, vision_dim=8, num_vision_tokens=4, hidden_size=16, num_heads=2, intermediate_size=32,
            dropout=0.0)
DATA = ["--num_images", "40", "--synthetic_image_size", "32"]


@pytest.fixture(autouse=True)
def one_thread():
    # on a shared, busy machine two OpenMP threads spin-wait on each other: small models run 10x slower
    with threadpool_limits(limits=1):
        yield


def tiny_reranker(seed=0, **overrides) -> CoAttentionReranker:
    torch.manual_seed(seed)
    return CoAttentionReranker(RerankerConfig(**{**TINY, **overrides})).eval()


def toy_split(num_images=8, captions_per_image=2, seed=0, noise=0.1):
    """A split whose tokens say which caption fits which image (a shared code) but whose dual embeddings are random."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(num_images, 8, generator=g)
    image_ids = [f"img{i}" for i in range(num_images)]
    captions = [f"caption {j} of img{i}" for i in range(num_images) for j in range(captions_per_image)]
    text_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    tokens = SplitTokens(
        {i: (codes[n][None, :] + noise * torch.randn(4, 8, generator=g)).half() for n, i in enumerate(image_ids)},
        {c: (codes[int(text_to_image[n])] + noise * torch.randn(3 + n % 3, 8, generator=g)).half()
         for n, c in enumerate(captions)})
    embeds = lambda n: torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    return tokens, EmbeddedSplit(embeds(num_images), embeds(len(captions)), text_to_image, image_ids, captions)


# ------------------------------------------------------------------------------------------- model
def test_scores_one_logit_per_pair_and_padding_tokens_change_nothing():
    reranker = tiny_reranker()
    text, vision = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    logits = reranker(text, mask, vision)
    assert logits.shape == (3,)
    # the same captions padded further, with garbage in the padding and in the padded positions
    longer = torch.cat([text, 100 * torch.randn(3, 4, 8)], dim=1)
    longer[1, 3:], longer[2, 1:] = -50.0, 77.0
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(reranker(longer, longer_mask, vision), logits, atol=1e-5, rtol=1e-5)
    # while a real token does change it
    assert not torch.allclose(reranker(longer, torch.ones_like(longer_mask), vision), logits, atol=1e-3)


def test_a_vision_token_count_other_than_the_configs_is_an_error_naming_it():
    with pytest.raises(ValueError, match="4 vision tokens"):
        tiny_reranker()(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.long), torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="num_heads"):
        RerankerConfig(hidden_size=10, num_heads=4)


def test_save_then_load_with_the_export_gives_identical_scores(tmp_path):
    reranker = tiny_reranker(seed=3, dual_weight=0.5)
    model_dir = save_tiny_model_dir(tmp_path / "export")
    assert load_reranker(model_dir) is None  # an export without one
    save_reranker(reranker, model_dir)
    loaded = load_reranker(model_dir)
    text, mask, vision = torch.randn(4, 6, 8), torch.ones(4, 6, dtype=torch.long), torch.randn(4, 4, 8)
    assert torch.equal(loaded(text, mask, vision), reranker(text, mask, vision))
    assert loaded.config.dual_weight == 0.5
    DualEncoderModel.from_pretrained(model_dir)  # the dual encoder still loads beside it


# ------------------------------------------------------------------------------------------ mining
def test_hard_negatives_are_the_top_scoring_wrong_partners_and_never_a_positive():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text_to_image = torch.arange(6).repeat_interleave(3)
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.3 * torch.randn(18, 8, generator=g), dim=-1)
    hard = mine_hard_negatives(images, texts, text_to_image, top_n=4, chunk_size=4)
    assert hard.captions.shape == (6, 4) and hard.images.shape == (18, 4)
    assert not (text_to_image[hard.captions] == torch.arange(6)[:, None]).any()
    assert not (hard.images == text_to_image[:, None]).any()
    scores = images @ texts.T
    scores[text_to_image[None, :] == torch.arange(6)[:, None]] = -9
    assert torch.equal(hard.captions.sort(1).values, scores.topk(4, dim=1).indices.sort(1).values)
    positives = torch.arange(18).repeat(20)
    from_mined = {}
    # drawn hard negatives, half hard and half random (--hard_fraction 0.5), random (--hard_negatives false)
    for name, table, fraction in (("hard", hard, 1.0), ("mixed", hard, 0.5), ("random", None, 1.0)):
        captions, other = draw_negatives(positives, text_to_image, table, torch.Generator().manual_seed(1), fraction)
        assert not (text_to_image[captions] == text_to_image[positives]).any()
        assert not (other == text_to_image[positives]).any()
        from_mined[name] = (hard.captions[text_to_image[positives]] == captions[:, None]).any(1).float().mean()
    assert from_mined["hard"] == 1.0 and 0.5 < from_mined["mixed"] < 1.0 and from_mined["random"] < 0.5
    with pytest.raises(ValueError, match="negatives_top_n"):
        mine_hard_negatives(images, texts, text_to_image, top_n=6)



def test_paraphrase_quantile_drops_captions_that_describe_the_image_as_well_as_its_own():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    text_to_image = torch.arange(8).repeat_interleave(3)
    texts = images[text_to_image] + 0.4 * torch.randn(24, 16, generator=g)
    texts[3] = texts[0] + 0.01 * torch.randn(16, generator=g)  # image 1's first caption paraphrases image 0's
    texts = torch.nn.functional.normalize(texts, dim=-1)
    images[0] = torch.nn.functional.normalize(images[0] + 2 * texts[3], dim=-1)  # ... and is image 0's top wrong one
    plain = mine_hard_negatives(images, texts, text_to_image, top_n=4)
    assert 3 in plain.captions[0].tolist() and 0 in plain.images[3].tolist() and plain.paraphrase_share == 0.0
    filtered = mine_hard_negatives(images, texts, text_to_image, top_n=4, paraphrase_quantile=0.9, chunk_size=3)
    assert 3 not in filtered.captions[0].tolist()  # image 0 does not get its paraphrase as a negative
    assert 0 not in filtered.images[3].tolist()  # nor the paraphrase image 0
    assert filtered.paraphrase_share > 0.0
    assert not (text_to_image[filtered.captions] == torch.arange(8)[:, None]).any()  # positives never, as before
    assert not (filtered.images == text_to_image[:, None]).any()
    # with too few other candidates left, paraphrases fill the table (positives still never do)
    every = mine_hard_negatives(images, texts, text_to_image, top_n=7, paraphrase_quantile=0.9)
    assert 0 in every.images[3].tolist() and not (every.images == text_to_image[:, None]).any()
    with pytest.raises(ValueError, match="quantile"):
        mine_hard_negatives(images, texts, text_to_image, top_n=4, paraphrase_quantile=50)
    # one caption per image (a user's data set): nothing to compare a caption with, so nothing is filtered
    first = torch.arange(0, 24, 3)
    alone = mine_hard_negatives(images, texts[first], torch.arange(8), top_n=4, paraphrase_quantile=0.5)
    assert torch.equal(alone.captions, mine_hard_negatives(images, texts[first], torch.arange(8), top_n=4).captions)
    assert alone.paraphrase_share == 0.0


# --------------------------------------------------------------------------------------- re-ranking
class Oracle(torch.nn.Module):
    """Scores a pair by how close its caption's code is to its image's: what a perfect re-ranker knows."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # a module with parameters says where it runs

    def forward(self, text, mask, vision):
        mean = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return -self.scale * (mean - vision.mean(1)).norm(dim=-1)


def test_reranking_permutes_only_within_the_top_k():
    tokens, embedded = toy_split(num_images=20, captions_per_image=2)
    before = embedded.metrics()
    for k in (5, 10):
        top = rerank_top_k(Oracle(), tokens, embedded, k, dual_scale=10.0)
        after = reranked_metrics(top, embedded.text_to_image)
        for key in [f"{d}_r{K}" for d in ("i2t", "t2i") for K in (1, 5, 10) if K >= k]:
            assert after[key] == before[key], key
        # the oracle puts every true pair inside the top-k first: R@1 becomes R@k
        assert after["i2t_r1"] == before[f"i2t_r{k}"] and after["t2i_r1"] == before[f"t2i_r{k}"]
        assert after["t2i_r1"] > before["t2i_r1"]
    # a top-k' taken from a top-k is the top-k' itself
    assert reranked_metrics(top.first(5), embedded.text_to_image) == reranked_metrics(
        rerank_top_k(Oracle(), tokens, embedded, 5, dual_scale=10.0), embedded.text_to_image)
    # a heavy blend weight gives the dual encoder's own order back
    assert reranked_metrics(top, embedded.text_to_image, dual_weight=1e6)["rsum"] == pytest.approx(before["rsum"])


def train_on_toy_set(epochs: int = 25, **objective) -> tuple[dict, dict, dict, dict]:
    """A tiny re-ranker trained on a separable toy split: (first epoch's stats, last epoch's, the dual encoder's
    metrics, the re-ranked ones)."""
    tokens, embedded = toy_split(num_images=8, captions_per_image=2)
    reranker = tiny_reranker(seed=1)
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    hard = mine_hard_negatives(embedded.image_embeds, embedded.text_embeds, embedded.text_to_image, top_n=4)
    generator = torch.Generator().manual_seed(0)
    epochs = [rerank_train.train_one_epoch(reranker, optimizer, scheduler, tokens, embedded, hard, positives=16,
                                           generator=generator, deadline=float("inf"), **objective)
              for _ in range(1 + epochs)]
    after = reranked_metrics(rerank_top_k(reranker, tokens, embedded, 8, dual_scale=10.0), embedded.text_to_image)
    return epochs[0], epochs[-1], embedded.metrics(), after


def test_training_on_a_separable_toy_set_beats_the_dual_encoder():
    first, last, before, after = train_on_toy_set(per_batch=8)
    assert last["loss"] < first["loss"] and last["itm_accuracy"] >= 0.9
    assert after["i2t_r1"] > before["i2t_r1"] and after["t2i_r1"] > before["t2i_r1"]


@pytest.mark.parametrize("dual_weight", [0.0, 1.0])
def test_the_listwise_objective_learns_to_put_each_groups_positive_first(dual_weight):
    """Groups of a positive and 3 mined negatives per direction, the dual encoder's logits added (weight 1) or not."""
    first, last, before, after = train_on_toy_set(per_batch=4, group_size=4, dual_scale=10.0 * dual_weight)
    assert first["pairs"] == 16 * 7  # per positive: itself, 3 negative captions, 3 negative images
    assert last["loss"] < first["loss"] and last["group_accuracy"] >= 0.9
    assert after["i2t_r1"] > before["i2t_r1"] and after["t2i_r1"] > before["t2i_r1"]


def test_groups_hold_distinct_mined_negatives_and_never_a_positive():
    text_to_image = torch.arange(6).repeat_interleave(3)
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.3 * torch.randn(18, 8, generator=g), dim=-1)
    hard = mine_hard_negatives(images, texts, text_to_image, top_n=4)
    positives = torch.arange(18)
    captions, other = draw_groups(positives, text_to_image, hard, torch.Generator().manual_seed(1), size=4)
    assert captions.shape == other.shape == (18, 3)
    for row in range(18):
        assert len(set(captions[row].tolist())) == 3 and set(captions[row].tolist()) <= set(
            hard.captions[text_to_image[row]].tolist())
        assert len(set(other[row].tolist())) == 3 and set(other[row].tolist()) <= set(hard.images[row].tolist())
    random_captions, random_images = draw_groups(positives, text_to_image, None, torch.Generator().manual_seed(1), 4)
    assert not (text_to_image[random_captions] == text_to_image[positives, None]).any()
    assert not (random_images == text_to_image[positives, None]).any()
    with pytest.raises(ValueError, match="group_size"):
        draw_groups(positives, text_to_image, hard, torch.Generator(), size=6)

def test_the_time_budget_ends_an_epoch_before_its_next_batch():
    tokens, embedded = toy_split()
    reranker = tiny_reranker()
    before = [p.detach().clone() for p in reranker.parameters()]
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = rerank_train.train_one_epoch(reranker, optimizer, scheduler, tokens, embedded, None, positives=16,
                                         per_batch=4, generator=torch.Generator(), deadline=time.monotonic() - 1)
    assert stats["pairs"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, reranker.parameters()))


# ----------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A saved tiny timm-CNN + DistilBERT dual encoder with its processor: a CNN map becomes the vision tokens."""
    path = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-export"))
    build_processor(DualEncoderConfig.from_pretrained(path)).save_pretrained(path)
    return path


def test_the_token_outputs_give_the_models_own_embeddings_and_a_cnn_map_becomes_tokens(tmp_path):
    path = save_tiny_model_dir(tmp_path / "flip", image_flip_average=True)
    processor = build_processor(DualEncoderConfig.from_pretrained(path))
    model = DualEncoderModel.from_pretrained(path).eval()
    view = load_split("synthetic", "train", 4, num_images=40, synthetic_image_size=32)
    reference = embed(model, processor, view, max_length=16, show_progress=False)
    tokens, embedded = split_features(model, processor, view, max_length=16)
    torch.testing.assert_close(embedded.image_embeds, reference.image_embeds, atol=2e-3, rtol=0)
    torch.testing.assert_close(embedded.text_embeds, reference.text_embeds, atol=2e-3, rtol=0)
    widths = tokens.widths  # the CNN's last block's [C, H, W] map: H*W tokens of width C
    hidden = model.vision_prefix(torch.zeros(1, 3, 32, 32), len(tower_blocks(model.vision_model)))
    assert widths["num_vision_tokens"] == hidden.shape[2] * hidden.shape[3] and widths["vision_dim"] == hidden.shape[1]
    _, alone = split_features(model, processor, view, max_length=16, mirror_average=False)  # mining: no mirror pass
    model.config.image_flip_average = False
    torch.testing.assert_close(alone.image_embeds, embed(model, processor, view, max_length=16,
                                                         show_progress=False).image_embeds, atol=2e-3, rtol=0)


def test_the_training_command_saves_a_reranker_that_evaluate_reports(tiny_export, tmp_path, capsys):
    output = tmp_path / "with-reranker"
    log = rerank_train.main(["--model_dir", tiny_export, "--data", "synthetic", *DATA, "--output", str(output),
                             "--epochs", "2", "--positives_per_epoch", "24", "--dev_images", "4", "--dev_top_k", "3",
                             "--negatives_top_n", "3", "--hidden_size", "16", "--num_heads", "2",
                             "--intermediate_size", "32", "--cache_dir", str(tmp_path / "cache"), "--quiet"])
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and all(e["pairs"] == 72 for e in log["epochs"])
    saved = json.loads((output / "reranker" / "training_log.json").read_text())
    assert saved["best_epoch"] == log["best_epoch"]
    assert list((tmp_path / "cache").glob("rerank-tokens-*.pt"))  # the towers ran once per split
    result = evaluate_model.main(["--model_dir", str(output), "--dataset", "synthetic", *DATA,
                                  "--rerank_top_k", "2", "4", "--quiet"])
    plain, rerank = result["results"]["model"]["metrics"], result["results"]["model"]["rerank"]
    assert sorted(rerank) == ["2", "4"] and rerank["4"]["ms_per_query"] > 0
    for key in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):  # K >= k: unchanged by re-ranking
        assert rerank["4"]["metrics"][key] == plain[key]
    printed = capsys.readouterr().out
    assert "re-ranked top-2" in printed and "ms per query" in printed
    best = log["epochs"][log["best_epoch"] - 1]["validation"]["metrics"]["rsum"]
    gain = load_reranker(output).config.validation_gain  # what the best epoch gained on validation, kept with it
    assert gain == pytest.approx(best - log["dual_encoder_validation"]["rsum"], abs=0.01)
    assert rerank["2"]["validation_gain"] == gain


def test_a_reranker_no_better_than_the_dual_encoder_on_validation_is_saved_with_a_warning(
        tiny_export, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(rerank_train, "validate", lambda *args: {"dual_weight": 0.0, "metrics": {"rsum": 1.0},
                                                                  "ms_per_query": 0.0, "seconds": 0.0})
    output = tmp_path / "worse"
    log = rerank_train.main(["--model_dir", tiny_export, "--data", "synthetic", *DATA, "--output", str(output),
                             "--epochs", "1", "--positives_per_epoch", "8", "--dev_images", "4", "--dev_top_k", "3",
                             "--negatives_top_n", "3", "--hidden_size", "16", "--num_heads", "2",
                             "--intermediate_size", "32", "--cache_dir", str(tmp_path / "cache"), "--quiet"])
    assert load_reranker(output).config.validation_gain == pytest.approx(1.0 - log["dual_encoder_validation"]["rsum"])
    assert "warning: no epoch re-ranked the 4 validation images better than the dual encoder" in capsys.readouterr().out
    evaluate_model.main(["--model_dir", str(output), "--dataset", "synthetic", *DATA, "--rerank_top_k", "2", "--quiet"])
    assert f"the re-ranker in {output} did not beat the dual encoder alone" in caplog.text



def test_the_training_command_takes_the_listwise_objective_and_the_paraphrase_filter(tiny_export, tmp_path):
    common = ["--model_dir", tiny_export, "--data", "synthetic", *DATA, "--output", str(tmp_path / "out"),
              "--epochs", "1", "--positives_per_epoch", "24", "--dev_images", "4", "--dev_top_k", "3",
              "--negatives_top_n", "3", "--hidden_size", "16", "--num_heads", "2", "--intermediate_size", "32",
              "--cache_dir", str(tmp_path / "cache"), "--quiet", "--objective", "listwise"]
    log = rerank_train.main([*common, "--group_size", "3", "--paraphrase_quantile", "0.5"])
    (epoch,) = log["epochs"]
    assert epoch["pairs"] == 24 * 5 and 0.0 <= epoch["group_accuracy"] <= 1.0  # a positive + 2 + 2 negatives
    assert log["options"]["objective"] == "listwise" and 0.0 <= log["paraphrase_share"] <= 1.0
    with pytest.raises(SystemExit, match="--group_size 1"):
        rerank_train.main([*common, "--group_size", "1"])
    unfiltered = rerank_train.main([*common, "--group_size", "3", "--paraphrase_quantile", "-1"])
    assert unfiltered["paraphrase_share"] == 0.0  # -1: the mined negatives are not filtered
    # without --data: the run's data set, from its training_args.json (here the synthetic set it was trained on)
    run = tmp_path / "run"
    shutil.copytree(tiny_export, run)
    data = dict(zip(DATA[::2], DATA[1::2]))
    (run / "training_args.json").write_text(json.dumps({"dataset": "synthetic", "num_images": int(data["--num_images"]),
                                                        "synthetic_image_size": int(data["--synthetic_image_size"])}))
    own = ["--model_dir", str(run), *common[4 + len(DATA):]]
    assert "--data" not in own and "--num_images" not in own
    assert rerank_train.main([*own, "--group_size", "3"])["epochs"][0]["pairs"] == 24 * 5

def test_evaluate_rerank_top_k_without_a_reranker_names_the_folder(tiny_export):
    with pytest.raises(SystemExit, match="no reranker/ folder"):
        evaluate_model.main(["--model_dir", tiny_export, "--dataset", "synthetic", *DATA, "--rerank_top_k", "4"])


def test_a_model_dir_without_a_saved_model_or_a_bad_layer_count_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        rerank_train.main(["--model_dir", str(tmp_path), "--data", "synthetic"])
    with pytest.raises(SystemExit, match="2-4 co-attention layers"):
        rerank_train.main(["--model_dir", str(tmp_path), "--data", "synthetic", "--num_layers", "6"])


def test_hard_negatives_false_is_the_random_negatives_ablation():
    args = rerank_train.build_parser().parse_args(["--model_dir", "m", "--data", "d", "--hard_negatives", "false"])
    assert args.hard_negatives is False
    with pytest.raises(SystemExit):
        rerank_train.build_parser().parse_args(["--model_dir", "m", "--data", "d", "--hard_negatives", "maybe"])


def test_the_speed_benchmark_reports_pairs_per_second(tmp_path):
    from benchmarks import rerank_speed

    out = tmp_path / "speed.json"
    result = rerank_speed.main(["--hidden_size", "16", "--intermediate_size", "32", "--vision_tokens", "4",
                                "--text_tokens", "3", "--batch_size", "6", "--steps", "1", "--output_json", str(out)])
    assert result["train_pairs_per_s"] > 0 and result["score_pairs_per_s"] > 0
    assert json.loads(out.read_text())["config"]["hidden_size"] == 16
