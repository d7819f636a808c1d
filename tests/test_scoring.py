"""CLIP-S / RefCLIP-S: the formulas, the batched scorer over a saved model, the command and the evaluate module."""

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_scripts import ImageTransform
from dualencoder.evaluation.scoring import (
    Scorer,
    clip_score,
    load_scorer,
    main,
    ref_clip_score,
    reference_similarity,
)
from dualencoder.processing import build_processor
from modeling_dualencoder import DualEncoderModel
from tests.tiny import save_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def test_clip_score_is_w_times_the_clipped_cosine():
    angles = torch.tensor([0.0, math.pi / 3, math.pi / 2, 2 * math.pi / 3])
    images = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    texts = 3.0 * torch.stack([angles.cos(), angles.sin()], 1)  # the scale must not matter
    torch.testing.assert_close(clip_score(images, texts), torch.tensor([2.5, 1.25, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(clip_score(images, texts, w=1.0), torch.tensor([1.0, 0.5, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_ref_clip_score_is_the_harmonic_mean_with_the_best_reference():
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    references = [torch.tensor([[0.0, 1.0], [0.6, 0.8]]),  # best cosine 0.6
                  torch.tensor([[-1.0, 0.0]]),  # only a negative cosine: clipped to 0
                  torch.zeros(0, 2)]  # no references
    similarity = reference_similarity(texts, references)
    torch.testing.assert_close(similarity, torch.tensor([0.6, 0.0, 0.0]))
    clip_s = torch.tensor([2.0, 2.0, 0.0])
    torch.testing.assert_close(ref_clip_score(clip_s, similarity), torch.tensor([2 * 2.0 * 0.6 / 2.6, 0.0, 0.0]))


def known_scorer(vectors: dict, calls: list) -> Scorer:
    """A scorer whose embeddings of images (names) and captions are looked up in ``vectors``; ``calls`` logs each batch."""
    scorer = Scorer(image_features=None, text_features=None, processor=None)

    def lookup(items):
        calls.append(list(items))
        return torch.nn.functional.normalize(torch.tensor([vectors[item] for item in items]), dim=-1)

    scorer.embed_images = scorer.embed_texts = lookup
    return scorer


def test_scorer_scores_each_pair_from_its_embeddings_and_embeds_each_item_once():
    vectors = {"img_a": [1.0, 0.0], "img_b": [0.0, 1.0], "a dog": [1.0, 1.0], "a cat": [0.0, -1.0],
               "ref dog": [1.0, 0.0]}
    calls = []
    out = known_scorer(vectors, calls).score(["img_a", "img_b", "img_a"], ["a dog", "a dog", "a cat"],
                                             [["ref dog"], ["ref dog", "a cat"], []])
    half = 2.5 * math.sqrt(0.5)
    torch.testing.assert_close(out["clip_score"], torch.tensor([half, half, 0.0]))
    ref = 2 * half * math.sqrt(0.5) / (half + math.sqrt(0.5))  # 'a dog' vs 'ref dog': cos sqrt(1/2)
    torch.testing.assert_close(out["ref_clip_score"], torch.tensor([ref, ref, 0.0]))
    assert calls == [["img_a", "img_b"], ["a dog", "a cat", "ref dog"]]


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """A tiny saved model, three image files and a pairs CSV with references."""
    root = tmp_path_factory.mktemp("scoring")
    model_dir = save_tiny_model_dir(root / "model")
    for name, color in [("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))]:
        Image.new("RGB", (40, 30), color).save(root / name)
    rows = [("red.png", "a red square", "a red picture|something red"), ("blue.png", "a blue square", ""),
            ("red.png", "a blue square", "a red picture")]
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "references"])
        writer.writerows(rows)
    return root, model_dir, rows


def test_a_saved_model_directory_scores_like_its_own_embeddings(tiny_pairs):
    root, model_dir, rows = tiny_pairs
    scorer = load_scorer(model_dir, batch_size=2)
    images = [str(root / image) for image, _, _ in rows]
    captions = [caption for _, caption, _ in rows]
    out = scorer.score(images, captions)

    model = DualEncoderModel.from_pretrained(model_dir).eval()
    processor = build_processor(model.config)
    transform = ImageTransform(processor.image_processor, train=False)
    pixels = torch.stack([transform.pixels(Image.open(path)) for path in images])
    tokens = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        cos = (model.get_image_features(pixel_values=pixels) * model.get_text_features(tokens["input_ids"], tokens["attention_mask"])).sum(-1)
    torch.testing.assert_close(out["clip_score"], 2.5 * cos.clamp(min=0), atol=1e-5, rtol=0)


def test_score_command_writes_each_pairs_scores(tiny_pairs, tmp_path):
    root, model_dir, rows = tiny_pairs
    out = tmp_path / "scored.csv"
    scores = main(["--scorer", model_dir, "--pairs", str(root / "pairs.csv"), "--out", str(out)])
    with open(out, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["caption"] for r in written] == [caption for _, caption, _ in rows]
    assert [float(r["clip_score"]) for r in written] == pytest.approx(scores["clip_score"].tolist(), abs=1e-5)
    assert float(written[1]["ref_clip_score"]) == 0.0  # no references
    assert all(0.0 <= float(r["clip_score"]) <= 2.5 for r in written)


def test_evaluate_module_loads_from_its_path_and_matches_the_scorer(tiny_pairs):
    evaluate = pytest.importorskip("evaluate")
    root, model_dir, rows = tiny_pairs
    images = [str(root / image) for image, _, _ in rows]
    captions = [caption for _, caption, _ in rows]
    references = [[r for r in refs.split("|") if r] for _, _, refs in rows]
    scorer = load_scorer(model_dir)
    expected = scorer.score(images, captions, references)

    metric = evaluate.load(str(ROOT / "metrics" / "clip_score"), "references")
    metric.add_batch(predictions=captions[:1], images=images[:1], references=references[:1])  # batched input
    got = metric.compute(predictions=captions[1:], images=images[1:], references=references[1:], scorer=scorer)
    assert got["clip_scores"] == pytest.approx(expected["clip_score"].tolist(), abs=1e-6)
    assert got["ref_clip_scores"] == pytest.approx(expected["ref_clip_score"].tolist(), abs=1e-6)
    assert got["clip_score"] == pytest.approx(expected["clip_score"].mean().item(), abs=1e-6)

    plain = evaluate.load(str(ROOT / "metrics" / "clip_score"))
    got = plain.compute(predictions=captions, images=images, scorer=model_dir)  # a model directory works as well
    assert set(got) == {"clip_score", "clip_scores"}
    assert got["clip_scores"] == pytest.approx(expected["clip_score"].tolist(), abs=1e-5)


def test_a_frozen_feature_baseline_scores_through_the_offline_backbones(tiny_pairs, tmp_path, monkeypatch):
    from dualencoder.baselines import LinearCCA, SplitFeatures
    from backbones_dualencoder import OFFLINE_TEXT, OFFLINE_VISION
    from tests.test_baselines import store_toy_features
    from dualencoder.evaluation.scoring import baseline_scorer

    root, _, rows = tiny_pairs
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setenv("DUALENCODER_FEATURE_CACHE", str(cache))
    g = torch.Generator().manual_seed(0)
    splits = {}
    for name, n in (("train", 40), ("validation", 10), ("test", 1)):  # the offline backbones' widths (1280, 384)
        images = torch.randn(n, 1280, generator=g)
        texts = images[:, :384] + 0.1 * torch.randn(n, 384, generator=g)
        splits[name] = SplitFeatures(images, texts, torch.arange(n), [f"{name}{i}.png" for i in range(n)],
                                     [f"{name} caption {i}" for i in range(n)])
    store_toy_features([splits[name] for name in ("train", "validation", "test")], cache, data_dir)
    (data_dir / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 200, 0)).save(data_dir / "images" / "test0.png")  # a cached image of the data set
    selected = {"ridge": 1.0, "k": 8, "power": 0.0, "val_rsum": 1.0}  # a BASELINES.json row's choice
    scorer = baseline_scorer("linear-cca", data_dir, selected)
    images = [str(root / image) for image, _, _ in rows]
    captions = [caption for _, caption, _ in rows]
    got = scorer.score(images, captions)["clip_score"]

    baseline = LinearCCA(ridges=(1.0,), dims=(8,), powers=(0.0,))
    baseline.fit(splits["train"].images, splits["train"].texts, val=splits["validation"])
    backbone = DualEncoderModel.from_vision_text_pretrained(OFFLINE_VISION, OFFLINE_TEXT).eval()
    processor = build_processor(backbone.config)
    transform = ImageTransform(processor.image_processor, train=False)
    tokens = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        image_embeds = baseline.embed_images(backbone.encode_vision(torch.stack([transform.pixels(Image.open(p))
                                                                                 for p in images])))
        text_embeds = baseline.embed_texts(backbone.encode_text(tokens["input_ids"], tokens["attention_mask"]))
    torch.testing.assert_close(got, 2.5 * (image_embeds * text_embeds).sum(-1).clamp(min=0), atol=1e-5, rtol=0)

    # the data set's own image and caption: their cached pooled features, no backbone (those are random
    # vectors here, which no backbone would give for a green square)
    cached = scorer.score([str(data_dir / "images" / "test0.png")], ["test caption 0"])["clip_score"]
    expected = (baseline.embed_images(splits["test"].images) * baseline.embed_texts(splits["test"].texts)).sum(-1)
    torch.testing.assert_close(cached, 2.5 * expected.clamp(min=0), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="CCA baselines only"):
        baseline_scorer("deep-cca", data_dir, {"epoch": 3})
