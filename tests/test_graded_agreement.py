"""The dev-split diagnostics of graded agreement (dualencoder/evaluation/graded_agreement.py): the stand-in judge,
the judged pairs it grades, and what the measures do with known scores."""

import numpy as np
import torch
import torch.nn.functional as F

from dualencoder.baselines import ContrastiveHeads, TrainOptions
from dualencoder.baselines.base import evaluate
from dualencoder.baselines.features import SplitFeatures
from dualencoder.evaluation.graded_agreement import (JudgedPairs, ReferenceAgreement, graded_agreement, heads_variant,
                                                     judged_dev_pairs)
from dualencoder.losses import CombinedLoss, TripletLoss

CORPUS = ["a dog runs on the grass", "a brown dog runs across a field", "a man rides a bicycle down the street",
          "a cyclist on a city road", "two children play in the snow", "kids throw snowballs outside",
          "a woman surfs a large wave", "a surfer riding a wave in the ocean"]


def captions_of_four_images():
    """4 images x 3 captions each, the captions of one image about one subject."""
    captions = ["a black dog runs on the grass", "a dog running across green grass", "the dog plays in a field",
                "a man rides a red bicycle", "a cyclist rides down the street", "a man on a bike in the city",
                "children play in the white snow", "two kids throw snow", "kids in snow jackets outside",
                "a woman surfs a big wave", "a surfer rides a wave", "a person surfing in the ocean"]
    return captions, torch.arange(4).repeat_interleave(3)


def test_the_stand_in_grades_a_caption_by_what_the_references_say():
    judge = ReferenceAgreement(CORPUS)
    references = [["a dog runs on the grass", "a brown dog in a field"]]
    grades = judge.matrix(["a dog runs across the grass", "a woman surfs a wave"], references)[0]
    assert grades[0] > 0.2 and grades[1] == 0.0
    # one pair at a time is the same number as the matrix
    assert np.allclose(judge.pairs(["a dog runs across the grass", "a woman surfs a wave"], references * 2), grades)


def test_judged_pairs_hold_out_one_own_caption_and_take_the_most_plausible_others_first():
    captions, text_to_image = captions_of_four_images()
    judge = ReferenceAgreement(captions)
    pairs = judged_dev_pairs(captions, text_to_image, judge, per_image=6, plausible=3, seed=1)
    assert len(pairs.truth) == 4 * 6
    for i in range(4):
        rows = (pairs.image == i).nonzero().flatten()
        chosen = pairs.caption[rows]
        assert list(pairs.kind[rows.numpy()]) == ["own"] + ["plausible"] * 3 + ["random"] * 2
        assert int(text_to_image[chosen[0]]) == i  # the first is an own caption...
        assert all(int(text_to_image[c]) != i for c in chosen[1:])  # ...and the only one
        assert len(set(chosen.tolist())) == 6
        # the held-out caption is graded against the image's other two captions, not itself
        others = [captions[c] for c in (text_to_image == i).nonzero().flatten().tolist() if c != int(chosen[0])]
        assert np.isclose(pairs.truth[rows[0]], judge.pairs([captions[chosen[0]]], [others])[0])
        # the plausible ones grade at least as high as the random ones
        assert pairs.truth[rows[1:4]].min() >= pairs.truth[rows[4:]].max()


def judged(per_image=5, images=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    truth = torch.rand(images * per_image, generator=generator).numpy()
    kind = np.tile(["own"] + ["plausible"] * (per_image - 1), images)
    return JudgedPairs(torch.arange(images).repeat_interleave(per_image), torch.arange(images * per_image), truth, kind)


def embeddings_with_cosines(cosines: torch.Tensor, image_of: torch.Tensor, dim: int = 4):
    """Unit image vectors e_0 and text vectors at the wanted cosine with them (the image side is the same vector)."""
    images = torch.zeros(int(image_of.max()) + 1, dim)
    images[:, 0] = 1.0
    texts = torch.zeros(len(cosines), dim)
    texts[:, 0] = cosines
    texts[:, 1] = (1 - cosines ** 2).clamp(min=0).sqrt()
    return images, texts


def test_scores_that_order_pairs_as_the_judge_does_agree_fully_and_offsets_per_image_only_hurt_across_images():
    pairs = judged()
    cos = torch.tensor(pairs.truth, dtype=torch.float32) * 0.5 + 0.1
    images, texts = embeddings_with_cosines(cos, pairs.image)
    exact = graded_agreement(images, texts, pairs)
    assert round(exact["cosine_tau_b"], 6) == 100.0 and round(exact["within_image_tau_b"], 6) == 100.0
    assert round(exact["plausible_tau_b"], 6) == 100.0
    assert exact["nonpositive_share"] == 0.0
    # a per-image offset (an image whose cosines all sit high) breaks the order across images, not within one
    offset = torch.linspace(-0.3, 0.3, int(pairs.image.max()) + 1)[pairs.image]
    images, texts = embeddings_with_cosines(cos + offset, pairs.image)
    shifted = graded_agreement(images, texts, pairs)
    assert shifted["cosine_tau_b"] < 60 and round(shifted["within_image_tau_b"], 6) == 100.0
    assert shifted["between_image_variance_share"] > 0.5
    assert shifted["centred_tau_b"] > shifted["cosine_tau_b"]
    # CLIP-S floors negative cosines at 0: they tie, and the share is counted
    assert shifted["nonpositive_share"] > 0.0 and shifted["clip_s_tau_b"] != shifted["cosine_tau_b"]


def test_csls_removes_an_image_offset_it_can_see_in_the_bank():
    pairs = judged(per_image=6, images=10)
    generator = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(10, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(60, 8, generator=generator), dim=-1)
    plain = graded_agreement(images, texts, pairs, bank=(images, texts), k=3)
    assert "csls_tau_b" in plain and -100.0 <= plain["csls_tau_b"] <= 100.0
    assert "csls_tau_b" not in graded_agreement(images, texts, pairs)


def test_heads_variants_name_their_loss_and_temperature():
    fixed = heads_variant("heads:clip:0.05")
    fixed.build(6, 5)
    assert not fixed.logit_scale.requires_grad and torch.isclose(fixed.logit_scale.exp(), torch.tensor(20.0))
    learned = heads_variant("heads:clip")
    learned.build(6, 5)
    assert learned.logit_scale.requires_grad
    assert isinstance(heads_variant("heads:clip+triplet").contrastive_loss, CombinedLoss)
    hinge = heads_variant("heads:triplet").contrastive_loss
    assert isinstance(hinge, TripletLoss) and hinge.margin == 0.2 and hinge.max_violation


def test_contrastive_heads_train_with_a_hinge_loss_and_a_fixed_temperature():
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(64, 4, generator=generator)
    images = torch.cat([latent, torch.randn(64, 6, generator=generator) * 0.1], 1)
    texts = latent @ torch.randn(4, 5, generator=generator)
    split = SplitFeatures(images[48:], texts[48:], torch.arange(16))
    for loss in ("triplet", "clip"):
        heads = ContrastiveHeads(projection_dim=8, hidden_dim=16, temperature=0.1, learn_temperature=False, loss=loss,
                                 options=TrainOptions(epochs=15, batch_size=16, patience=0))
        heads.fit(images[:48], texts[:48], val=split)
        assert evaluate(heads, split)["i2t_r1"] > 100 / 16 * 2  # well above chance (1 in 16)
        assert torch.isclose(heads.logit_scale.exp(), torch.tensor(10.0))  # the fixed temperature stayed


def test_other_poolings_of_the_captions_are_computed_once_and_cached(tmp_path):
    from dualencoder.evaluation.graded_agreement import text_features_pooled

    captions = ["a dog runs on the grass", "a surfer rides a wave"]
    cls = text_features_pooled(captions, "cls", tmp_path)
    mean = text_features_pooled(captions, "mean", tmp_path)
    assert cls.shape == mean.shape == (2, 384) and not torch.allclose(cls, mean)
    assert len(list(tmp_path.glob("text-cls-*.pt"))) == 1
    assert torch.equal(text_features_pooled(captions, "cls", tmp_path), cls)
