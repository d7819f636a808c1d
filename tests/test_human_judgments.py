"""Flickr8K-CF: reading the judgments, pairing them with captions and references, Kendall tau-b, the command."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_scripts.report import DatasetFormatError
from dualencoder.evaluation.human_judgments import (
    Judgment,
    correlations,
    judged_pairs,
    kendall_tau_b,
    main,
    read_crowdflower,
)
from dualencoder.evaluation.scoring import load_scorer
from tests.tiny import save_tiny_model_dir

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"

FIXTURE = """\
a.jpg\ta.jpg#0\t1\t3\t0
a.jpg\tb.jpg#1\t0\t0\t3
a.jpg\tb.jpg#0\t0.333333333333333\t1\t2
b.jpg\tb.jpg#1\t0.75\t3\t1
b.jpg\ta.jpg#2\t0\t0\t4
"""

TOKENS = "".join(f"{image}#{k}\t{image[0]} caption  {k}\n" for image in ("a.jpg", "b.jpg") for k in range(3))


def fake_flickr8k(root: Path) -> Path:
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "CrowdFlowerAnnotations.txt").write_text(FIXTURE)
    (text / "Flickr8k.token.txt").write_text(TOKENS)
    (root / "Flicker8k_Dataset").mkdir()
    for name, color in (("a.jpg", (200, 30, 30)), ("b.jpg", (30, 30, 200))):
        Image.new("RGB", (32, 24), color).save(root / "Flicker8k_Dataset" / name)
    return root


def test_read_crowdflower_parses_each_field(tmp_path):
    path = tmp_path / "cf.txt"
    path.write_text(FIXTURE)
    judgments = read_crowdflower(path)
    assert len(judgments) == 5
    assert judgments[0] == Judgment("a.jpg", "a.jpg#0", 1.0, 3, 0)
    assert judgments[2].share_yes == pytest.approx(1 / 3) and (judgments[2].yes, judgments[2].no) == (1, 2)
    path.write_text(FIXTURE + "c.jpg\tc.jpg#0\tmany\t1\t1\n")
    with pytest.raises(DatasetFormatError, match="line 6"):
        read_crowdflower(path)
    path.write_text("c.jpg\tc.jpg#0\t0.9\t1\t1\n")  # 0.9 is not 1 / (1 + 1)
    with pytest.raises(DatasetFormatError, match="line 1"):
        read_crowdflower(path)


def test_judged_pairs_look_up_captions_and_leave_judged_captions_out_of_the_references(tmp_path):
    pairs = judged_pairs(fake_flickr8k(tmp_path))
    assert pairs["captions"] == ["a caption 0", "b caption 1", "b caption 0", "b caption 1", "a caption 2"]
    assert [Path(p).name for p in pairs["images"]] == ["a.jpg", "a.jpg", "a.jpg", "b.jpg", "b.jpg"]
    assert pairs["references"][0] == ["a caption 1", "a caption 2"]  # a.jpg#0 was judged with a.jpg
    assert pairs["references"][3] == ["b caption 0", "b caption 2"]  # b.jpg#1 was judged with b.jpg
    assert pairs["human"] == pytest.approx([1.0, 0.0, 1 / 3, 0.75, 0.0])


def test_kendall_tau_b_of_orders_and_ties():
    human = [1.0, 0.0, 1 / 3, 0.75, 0.0]
    assert kendall_tau_b(human, human) == pytest.approx(100.0)
    assert kendall_tau_b([-h for h in human], human) == pytest.approx(-100.0)
    # Of the 10 pairs, human ties 1 (items 1, 4) and the scores tie another (items 2, 3); the other 8
    # are ordered alike. tau-b = (8 - 0) / sqrt(9 * 9); tau-a would be 8 / 10.
    scores = [3.0, 1.0, 2.0, 2.0, 0.5]
    concordant, discordant, untied_scores, untied_human = 8, 0, 9, 9
    expected = 100 * (concordant - discordant) / (untied_scores * untied_human) ** 0.5
    assert kendall_tau_b(torch.tensor(scores), human) == pytest.approx(expected)


def test_correlations_rank_the_scorers_scores_against_the_human_ones(tmp_path):
    pairs = judged_pairs(fake_flickr8k(tmp_path))

    class ByHuman:
        def score(self, images, captions, references, w):
            human = torch.tensor(pairs["human"])
            return {"clip_score": w * human, "ref_clip_score": -human}

    assert correlations(ByHuman(), pairs) == pytest.approx({"clip_score_tau_b": 100.0, "ref_clip_score_tau_b": -100.0})


def test_command_scores_a_saved_model_and_keeps_other_entries(tmp_path):
    data = fake_flickr8k(tmp_path / "flickr8k")
    # (this random model's cosines on these pairs are positive: with all of them negative every CLIP-S
    # would be 0, and the tau of constant scores is undefined)
    model_dir = save_tiny_model_dir(tmp_path / "model", projection_dim=32)
    out = tmp_path / "doc" / "HUMAN.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"earlier": {"clip_score_tau_b": 1.0, "ref_clip_score_tau_b": 2.0, "pairs": 5,
                                            "seconds": 3.0, "command": "earlier"}}))
    result = main(["--scorer", model_dir, "--data", str(data), "--out", str(out), "--name", "tiny"])
    saved = json.loads(out.read_text())
    assert set(saved) == {"earlier", "tiny"} and saved["tiny"]["pairs"] == 5
    expected = correlations(load_scorer(model_dir), judged_pairs(data))
    assert {key: result["tiny"][key] for key in expected} == pytest.approx(expected)
    assert all(-100.0 <= value <= 100.0 for value in expected.values())
    page = out.with_suffix(".md").read_text()
    assert "| tiny |" in page and "| earlier |" in page and "34.4" in page


def test_a_rerankers_match_probability_and_final_score_are_scored_against_people(tmp_path):
    from dualencoder.evaluation.common import DEFAULT_MAX_LENGTH, load_model, load_split
    from dualencoder.processing import build_processor
    from dualencoder.rerank.features import split_features
    from dualencoder.rerank.model import CoAttentionReranker, RerankerConfig, save_reranker
    from dualencoder.rerank.rerank import pair_scores
    from modeling_dualencoder import DualEncoderConfig

    data = fake_flickr8k(tmp_path / "flickr8k")
    with open(data / "Flickr8k_text" / "Flickr8k.token.txt", "a") as tokens:  # a train and a dev image beside the two
        tokens.write("".join(f"{image}#{k}\t{image[0]} caption  {k}\n" for image in ("c.jpg", "d.jpg")
                             for k in range(3)))
    for name in ("c.jpg", "d.jpg"):
        Image.new("RGB", (32, 24), (30, 200, 30)).save(data / "Flicker8k_Dataset" / name)
    for split, images in (("train", "c.jpg"), ("dev", "d.jpg"), ("test", "a.jpg\nb.jpg")):
        (data / "Flickr8k_text" / f"Flickr_8k.{split}Images.txt").write_text(images + "\n")
    model_dir = save_tiny_model_dir(tmp_path / "model", projection_dim=32)
    build_processor(DualEncoderConfig.from_pretrained(model_dir)).save_pretrained(model_dir)
    with pytest.raises(SystemExit, match="no reranker/ folder"):  # an export without one is named
        main(["--scorer", f"reranker:{model_dir}", "--data", str(data), "--out", str(tmp_path / "H.json")])
    model, processor = load_model(model_dir, "cpu")
    view = load_split(str(data), "test")
    tokens, _ = split_features(model, processor, view, max_length=DEFAULT_MAX_LENGTH)
    torch.manual_seed(0)
    reranker = CoAttentionReranker(RerankerConfig(**tokens.widths, hidden_size=16, num_layers=2, num_heads=2,
                                                  intermediate_size=32, dual_weight=0.5))
    save_reranker(reranker, model_dir)

    out = tmp_path / "doc" / "HUMAN.json"  # (a model without training_args.json: the evaluation default max_length)
    result = main(["--scorer", f"reranker:{model_dir}", "--data", str(data), "--out", str(out), "--name", "rr"])
    pairs = judged_pairs(data)
    # the fixture's captions have a double space: the split's own strings are found from the judged, normalised ones
    scores = pair_scores(model, processor, reranker, view, [Path(i).name for i in pairs["images"]],
                         [c.replace("caption ", "caption  ") for c in pairs["captions"]],
                         max_length=DEFAULT_MAX_LENGTH)
    probability, final = "rr, match probability", "rr, final score (ITM logit + dual_weight x dual logit)"
    assert result[probability]["clip_score_tau_b"] == pytest.approx(kendall_tau_b(scores["match_probability"],
                                                                                   pairs["human"]))
    assert result[final]["clip_score_tau_b"] == pytest.approx(kendall_tau_b(scores["final"], pairs["human"]))
    assert result[probability]["ref_clip_score_tau_b"] is None
    assert set(json.loads(out.read_text())) == {probability, final}
    assert "| rr, match probability |" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="not in the split"):
        pair_scores(model, processor, reranker, view, ["c.jpg"], ["a caption  0"], max_length=DEFAULT_MAX_LENGTH)


@pytest.mark.skipif(not (REAL / "Flickr8k_text" / "CrowdFlowerAnnotations.txt").is_file(),
                    reason="needs ../shared/data/flickr8k")
def test_the_real_flickr8k_cf_file():
    judgments = read_crowdflower(REAL / "Flickr8k_text" / "CrowdFlowerAnnotations.txt")
    assert len(judgments) == 47830
    test_images = set((REAL / "Flickr8k_text" / "Flickr_8k.testImages.txt").read_text().split())
    assert {j.image for j in judgments} == test_images  # every judged image is a test image, all 1,000 of them
    pairs = judged_pairs(REAL)
    assert len(pairs["captions"]) == 47830 and all(pairs["captions"])
    assert all(caption not in refs for caption, refs in zip(pairs["captions"], pairs["references"]))
    assert sum(map(len, pairs["references"])) > 3 * 47830  # most images keep 4 of their 5 captions
