"""Why may a retrieval model grade image-caption pairs unlike people? Dev-split diagnostics (issue 29, part 3).

People's graded judgments of Flickr8k pairs (Flickr8K-CF, :mod:`.human_judgments`) exist only for
test images, where nothing may be chosen. This module builds a judged set of the same shape on the
validation split without people, and measures on it what a scorer's scores do:

* **The judged set** (:func:`judged_dev_pairs`): for each validation image, one of its own captions
  (held out of its references) and 47 captions of other validation images, half of them the most
  plausible by the stand-in below, half drawn at random: about 48 pairs per image, as in
  Flickr8K-CF, whose candidates were likewise mostly other images' captions.
* **The stand-in judge** (:class:`ReferenceAgreement`): how much a caption says what the image's
  own (held-out-free) reference captions say, as the mean TF-IDF cosine of word 1-2-grams (stop
  words out, fitted on the training captions). Model-free, so it favours no scorer's text tower.
  How well it tracks people is measured once on the CF test pairs (:func:`stand_in_on_people`):
  report-only, nothing is chosen by it.
* **What is measured** (:func:`graded_agreement`), Kendall tau-b x 100 against the stand-in over
  all pairs (the CF protocol): of CLIP-S (``w * max(cos, 0)``), of the raw cosine (no floor at 0,
  so negative cosines are not tied), the mean tau-b *within* an image's 48 pairs (what retrieval
  needs: the order of one query's candidates) against the tau-b *across* images (what a global
  score needs as well: an image whose cosines all sit high must not outrank a better-described
  image whose cosines sit low), the share of pairs at cosine <= 0, the share of the cosines'
  variance that is between images, and CSLS (Conneau et al. 2018), the cosine less each side's
  mean similarity to its ``k`` nearest neighbours in a bank of training images and captions,
  which removes such per-image and per-caption offsets (hubness) without labels.

``python -m dualencoder.evaluation.graded_agreement --data ../shared/data/flickr8k --out doc/GRADED_AGREEMENT.json``
scores the shipped model, the frozen-feature baselines and MLP heads trained on the same frozen
features with each loss term and temperature (:class:`dualencoder.baselines.ContrastiveHeads`),
and writes the table of doc/GRADED_AGREEMENT.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dualencoder.evaluation.human_judgments import judged_pairs, kendall_tau_b
from dualencoder.evaluation.scoring import CLIP_S_WEIGHT, clip_score

logger = logging.getLogger(__name__)

PER_IMAGE = 48  # Flickr8K-CF judged 47.8 captions per test image
PLAUSIBLE = 24  # of them, the stand-in's most plausible captions of other images; the rest at random
CSLS_K = 10


def tau_b(scores, truth) -> float:
    """100 x Kendall tau-b, as the CF protocol computes it (:func:`.human_judgments.kendall_tau_b`); 0 when either
    side is constant (one image's 48 pairs can be)."""
    value = kendall_tau_b(np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64))
    return 0.0 if np.isnan(value) else value


class ReferenceAgreement:
    """A model-free stand-in judge: mean TF-IDF cosine (word 1-2-grams) of a caption with an image's references.

    Fitted on a corpus of captions (the training split's), so rare content words ("skateboard", "bride")
    weigh more than frequent ones ("man", "dog") and stop words nothing.
    """

    def __init__(self, corpus) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), stop_words="english", sublinear_tf=True).fit(list(corpus))

    def reference_means(self, references):
        """[R, V] sparse: the mean L2-normalised TF-IDF row of each reference list (an empty row for an empty list)."""
        from scipy.sparse import csr_matrix

        flat = [ref for refs in references for ref in refs]
        rows = np.repeat(np.arange(len(references)), [len(refs) for refs in references])
        weights = np.concatenate([np.full(len(refs), 1.0 / len(refs)) for refs in references if refs] or [[]])
        average = csr_matrix((weights, (rows, np.arange(len(flat)))), shape=(len(references), len(flat)))
        return average @ self.vectorizer.transform(flat)

    def matrix(self, captions, references) -> np.ndarray:
        """[R, C] agreement of every caption with every reference list (mean cosine = dot with the mean row)."""
        return (self.reference_means(references) @ self.vectorizer.transform(list(captions)).T).toarray()

    def pairs(self, captions, references) -> np.ndarray:
        """[P] agreement of caption p with reference list p."""
        texts = self.vectorizer.transform(list(captions))
        return np.asarray(texts.multiply(self.reference_means(references)).sum(axis=1)).ravel()


@dataclass
class JudgedPairs:
    """Pairs of a split's images and captions (indices into its embeddings) with a graded truth per pair."""

    image: torch.Tensor  # [P] image row
    caption: torch.Tensor  # [P] caption row
    truth: np.ndarray  # [P] the stand-in's (or people's) grade
    kind: np.ndarray  # [P] "own", "plausible" or "random": how the pair was chosen


def judged_dev_pairs(captions, text_to_image, agreement: ReferenceAgreement, *, per_image: int = PER_IMAGE,
                     plausible: int = PLAUSIBLE, seed: int = 0) -> JudgedPairs:
    """For each image: one own caption (held out of its references), `plausible` others by agreement, the rest random.

    The references of an image are its captions minus the held-out one, so no candidate grades itself.
    """
    text_to_image = torch.as_tensor(text_to_image)
    num_images = int(text_to_image.max()) + 1
    if plausible >= per_image:
        raise ValueError(f"plausible ({plausible}) must leave room in per_image ({per_image}) for the own caption")
    rng = np.random.default_rng(seed)
    own = [np.flatnonzero(text_to_image.numpy() == i) for i in range(num_images)]
    held_out = [int(rng.choice(rows)) for rows in own]
    references = [[captions[r] for r in rows if r != held] for rows, held in zip(own, held_out)]
    grades = agreement.matrix(captions, references)  # [Ni, Nt]
    images, texts, truth = [], [], []
    kind = np.array(["own"] + ["plausible"] * plausible + ["random"] * (per_image - 1 - plausible))
    for i in range(num_images):
        others = np.setdiff1d(np.arange(len(captions)), own[i])
        best = others[np.argsort(-grades[i, others], kind="stable")[:plausible]]
        rest = rng.choice(np.setdiff1d(others, best), size=per_image - 1 - plausible, replace=False)
        chosen = np.concatenate([[held_out[i]], best, rest])
        images += [i] * len(chosen)
        texts += chosen.tolist()
        truth += grades[i, chosen].tolist()
    return JudgedPairs(torch.tensor(images), torch.tensor(texts), np.asarray(truth), np.tile(kind, num_images))


def neighbour_means(queries: torch.Tensor, bank: torch.Tensor, k: int = CSLS_K) -> torch.Tensor:
    """[N] each query's mean cosine to its k most similar bank rows (both sides L2-normalised)."""
    return (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1).values.mean(1)


def graded_agreement(image_embeds: torch.Tensor, text_embeds: torch.Tensor, pairs: JudgedPairs, *,
                     bank: tuple[torch.Tensor, torch.Tensor] | None = None, k: int = CSLS_K,
                     w: float = CLIP_S_WEIGHT) -> dict:
    """How a scorer's pair scores order the judged pairs, and the properties of its cosines that explain it.

    `bank` = (image embeddings, text embeddings) of other data (the training split) for CSLS.
    """
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    cos = (image_embeds[pairs.image] * text_embeds[pairs.caption]).sum(-1)
    counts = torch.bincount(pairs.image).clamp(min=1)
    per_image_mean = (torch.bincount(pairs.image, weights=cos.double()) / counts).float()
    within = [tau_b(cos[pairs.image == i].numpy(), pairs.truth[(pairs.image == i).numpy()])
              for i in pairs.image.unique().tolist()]
    plausible = torch.as_tensor(pairs.kind == "plausible")
    out = {
        "clip_s_tau_b": tau_b(clip_score(image_embeds[pairs.image], text_embeds[pairs.caption], w).numpy(),
                              pairs.truth),
        "plausible_tau_b": tau_b(cos[plausible].numpy(), pairs.truth[plausible.numpy()]),
        "cosine_tau_b": tau_b(cos.numpy(), pairs.truth),
        "within_image_tau_b": float(np.mean(within)),
        "centred_tau_b": tau_b((cos - per_image_mean[pairs.image]).numpy(), pairs.truth),
        "nonpositive_share": float((cos <= 0).float().mean()),
        "between_image_variance_share": float(per_image_mean[pairs.image].var() / cos.var()),
        "cosine_mean": float(cos.mean()),
        "cosine_std": float(cos.std()),
    }
    if bank is not None:
        bank_images, bank_texts = (b.float() for b in bank)
        r_image = neighbour_means(image_embeds, bank_texts, k)
        r_text = neighbour_means(text_embeds, bank_images, k)
        csls = 2 * cos - r_image[pairs.image] - r_text[pairs.caption]
        out["csls_tau_b"] = tau_b(csls.numpy(), pairs.truth)
    return out


# ------------------------------------------------------------------------------------------ scorers
@dataclass
class Embedded:
    """A scorer's embeddings of the validation split and of the bank (training images and their captions)."""

    images: torch.Tensor
    texts: torch.Tensor
    bank_images: torch.Tensor
    bank_texts: torch.Tensor
    rsum: float  # validation retrieval RSUM of these embeddings
    notes: dict
    captions: list  # the validation captions in the rows' order


def heads_variant(spec: str):
    """`heads:<loss>[:<temperature>]` -> ContrastiveHeads with that loss and a fixed temperature (learned if absent).

    ``<loss>`` is a :func:`dualencoder.losses.build_loss` name; ``clip+triplet`` takes the shipped recipe's
    options (margin 0.2, weight 1). Batches hold one caption per image, so ``positives`` changes nothing here.
    """
    from dualencoder.baselines import ContrastiveHeads, TrainOptions

    parts = spec.split(":")
    loss = parts[1]
    options = {"margin": 0.2} if "triplet" in loss else {}
    if len(parts) > 2:
        return ContrastiveHeads(temperature=float(parts[2]), learn_temperature=False, loss=loss, loss_options=options,
                                options=TrainOptions(batch_size=512))
    return ContrastiveHeads(loss=loss, loss_options=options, options=TrainOptions(batch_size=512))


def text_features_pooled(captions: list, pooling: str, cache_dir=None) -> torch.Tensor:
    """[N, 384] the frozen offline MiniLM's features of `captions` pooled by `pooling` ("cls" or "mean"), cached."""
    import hashlib

    from backbones_dualencoder import OFFLINE_TEXT, OFFLINE_VISION
    from dualencoder.evaluation.embed import pooled_text_features
    from dualencoder.feature_store import feature_file, load_or_compute
    from dualencoder.processing import build_processor
    from modeling_dualencoder import DualEncoderModel

    def compute() -> dict:
        model = DualEncoderModel.from_vision_text_pretrained(OFFLINE_VISION, OFFLINE_TEXT, text_pooling=pooling).eval()
        pooled = pooled_text_features(model, captions, build_processor(model.config).tokenizer, max_length=64,
                                      batch_size=128, device="cpu", desc=f"{pooling}-pooled captions")
        return {"texts": torch.stack([pooled[c] for c in captions])}

    key = hashlib.sha1(repr((OFFLINE_TEXT, pooling, 64, captions)).encode()).hexdigest()[:16]
    return load_or_compute(feature_file(cache_dir, f"text-{pooling}", key), compute)["texts"]


def embed_frozen(spec: str, features: dict, bank_images: int, baselines_json=None, cache_dir=None) -> Embedded:
    """A baseline (`baseline:<name>`) or heads variant (`heads:...`) fitted on the frozen training features.

    A suffix `@cls` (e.g. `heads:clip@cls`) replaces the captions' mean-pooled MiniLM features by its [CLS] token's.
    """
    from dataclasses import replace

    from dualencoder.evaluation.scoring import fit_baseline, recorded_selection
    from dualencoder.metrics import retrieval_metrics

    spec, _, pooling = spec.partition("@")
    if pooling:
        features = {name: replace(split, texts=text_features_pooled(split.captions, pooling, cache_dir))
                    for name, split in features.items() if name in ("train", "validation")}
    train, val = features["train"], features["validation"]
    if spec.startswith("heads:"):
        fitted = heads_variant(spec)
        fitted.fit(train.images, train.texts, train.text_to_image, val=val)
    else:
        name = spec.split(":", 1)[1]
        fitted = fit_baseline(name, features, recorded_selection(baselines_json, name))
    bank_texts = train.text_to_image < bank_images
    notes = {"selected": fitted.selected, "train_seconds": round(fitted.train_seconds, 1)}
    if hasattr(fitted, "logit_scale"):  # a hinge alone ignores it (its margin is in cosine units)
        notes["temperature"] = (round(float(1 / fitted.logit_scale.detach().clamp(max=np.log(100.0)).exp()), 4)
                                if "clip" in spec else "unused")
    images, texts = fitted.embed_images(val.images), fitted.embed_texts(val.texts)
    rsum = retrieval_metrics(images, texts, val.text_to_image, device="cpu")["rsum"]
    return Embedded(images, texts, fitted.embed_images(train.images[:bank_images]),
                    fitted.embed_texts(train.texts[bank_texts]), rsum, notes, val.captions)


def embed_model(model_dir: str, data: str, bank_images: int, cache_dir=None) -> Embedded:
    """A trained model directory: the validation split and the first `bank_images` training images, from pixels.

    Cached in `cache_dir` by the model's weights, the data's images and `bank_images` (minutes on a CPU).
    """
    from data_scripts import images_fingerprint
    from dualencoder.evaluation.common import data_options, embed, load_model, load_split
    from dualencoder.feature_store import feature_file, load_or_compute, tower_fingerprint

    model, processor = load_model(model_dir, "cpu")
    options = data_options(model_dir, dataset=data)
    views = {"validation": load_split(**{**options, "split": "validation"}),
             "bank": load_split(**{**options, "split": "train", "max_images": bank_images})}

    def compute() -> dict:
        val, bank = (embed(model, processor, views[name], max_length=options["max_length"]) for name in views)
        return {"images": val.image_embeds, "texts": val.text_embeds, "bank_images": bank.image_embeds,
                "bank_texts": bank.text_embeds, "rsum": torch.tensor(val.metrics()["rsum"]), "captions": val.captions}

    key = tower_fingerprint(model, options["max_length"], bank_images, images_fingerprint(list(views.values())))
    found = load_or_compute(feature_file(cache_dir, "graded-agreement", key), compute)
    notes = {"temperature": round(float(1 / model.get_logit_scale().detach()), 4)}
    return Embedded(found["images"], found["texts"], found["bank_images"], found["bank_texts"], float(found["rsum"]),
                    notes, list(found["captions"]))


def stand_in_on_people(data_dir, agreement: ReferenceAgreement) -> float:
    """Tau-b x 100 of the stand-in judge against the Flickr8K-CF share of "yes" (test pairs; report-only)."""
    pairs = judged_pairs(data_dir)
    return tau_b(agreement.pairs(pairs["captions"], pairs["references"]), pairs["human"])


def render_markdown(saved: dict) -> str:
    head = ("| scorer | dev RSUM | CLIP-S tau-b | cosine tau-b | within-image tau-b | plausible-only tau-b | centred "
            "tau-b | CSLS tau-b | cos <= 0 | between-image variance | temperature |\n| --- " + "| ---: " * 10 + "|")
    rows = []
    for name, row in saved["scorers"].items():
        rows.append(f"| {name} | {row['rsum']:.1f} | {row['clip_s_tau_b']:.1f} | {row['cosine_tau_b']:.1f} | "
                    f"{row['within_image_tau_b']:.1f} | {row['plausible_tau_b']:.1f} | {row['centred_tau_b']:.1f} | "
                    f"{row['csls_tau_b']:.1f} | "
                    f"{100 * row['nonpositive_share']:.1f}% | {100 * row['between_image_variance_share']:.1f}% | "
                    f"{row['notes'].get('temperature', '-')} |")
    return ("# Graded agreement on the validation split (generated)\n\n"
            "Generated by `python -m dualencoder.evaluation.graded_agreement` from the JSON beside this page (do not "
            "edit by hand); the reading of it is in doc/HUMAN_JUDGMENTS_ANALYSIS.md. Kendall tau-b x 100 against the "
            "stand-in judge over "
            f"{saved['pairs']} judged validation pairs ({saved['per_image']} per image: its held-out own caption, "
            f"{saved['plausible']} plausible and the rest random captions of other validation images). Stand-in "
            "judge against people on the Flickr8K-CF test pairs (report-only): tau-b "
            f"{saved['stand_in_vs_people']:.1f}."
            f" CSLS bank: the first {saved['bank_images']} training images and their captions, k = {saved['k']}.\n\n"
            + head + "\n" + "\n".join(rows) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/flickr8k", help="Flickr8k directory (official layout)")
    parser.add_argument("--scorers", nargs="+", default=[
        "outputs/flickr8k_offline", "baseline:linear-cca", "baseline:kernel-cca", "heads:clip",
        "heads:clip:0.01", "heads:clip:0.05", "heads:clip:0.2", "heads:triplet", "heads:clip+triplet", "heads:clip@cls",
        "baseline:kernel-cca@cls"],
        help="model directories, baseline:<name> or heads:<loss>[:<fixed temperature>][@cls] (@cls: the captions' "
             "[CLS] token instead of their mean-pooled MiniLM features)")
    parser.add_argument("--baselines_json", default="doc/BASELINES.json",
                        help="the dev-chosen settings of the CCA baselines")
    parser.add_argument("--bank_images", type=int, default=1000, help="training images (and captions) in the CSLS bank")
    parser.add_argument("--out", default="doc/GRADED_AGREEMENT.json", help="JSON to add entries to (and .md beside)")
    parser.add_argument("--cache_dir", default=None,
                        help="keep a model's embeddings and other poolings' caption features here (default: the "
                             "baselines' feature cache, ~/.cache/dualencoder/features)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    from dualencoder.baselines import load_features

    from dualencoder.baselines.features import default_cache_root

    args.cache_dir = args.cache_dir or str(default_cache_root())
    features = load_features(args.data, ("train", "validation"), max_length=64)
    agreement = ReferenceAgreement(features["train"].captions)
    val = features["validation"]
    pairs = judged_dev_pairs(val.captions, val.text_to_image, agreement, seed=args.seed)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"scorers": {}}
    saved.update(pairs=len(pairs.truth), per_image=PER_IMAGE, plausible=PLAUSIBLE, bank_images=args.bank_images,
                 k=CSLS_K, stand_in_vs_people=stand_in_on_people(args.data, agreement))
    logger.info("stand-in judge against people (CF test pairs, report-only): tau-b %.1f", saved["stand_in_vs_people"])
    for spec in args.scorers:
        started = time.time()
        embedded = (embed_frozen(spec, features, args.bank_images, args.baselines_json, args.cache_dir)
                    if spec.split(":")[0] in ("baseline", "heads")
                    else embed_model(spec, args.data, args.bank_images, args.cache_dir))
        if embedded.captions != val.captions:  # the pairs index the feature cache's caption order
            raise SystemExit(f"{spec}: its validation captions are not the feature cache's, in the same order")
        row = {**graded_agreement(embedded.images, embedded.texts, pairs,
                                  bank=(embedded.bank_images, embedded.bank_texts)),
               "rsum": embedded.rsum, "notes": embedded.notes, "seconds": round(time.time() - started, 1)}
        logger.info("%s: %s", spec, row)
        saved["scorers"][spec] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved, indent=2))
        out.with_suffix(".md").write_text(render_markdown(saved))
    return saved


if __name__ == "__main__":
    main()
