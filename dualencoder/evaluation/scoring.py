"""Score image–caption pairs as people judge them: CLIP-S and RefCLIP-S (Hessel et al., EMNLP 2021).

    CLIP-S(c, v)       = w * max(cos(c, v), 0)                         (w = 2.5, the paper's)
    RefCLIP-S(c, R, v) = H-mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0))

A :class:`Scorer` is anything that puts images and captions in one space: a saved
``DualEncoderModel`` directory, the untrained joined backbones with random heads (a floor), or a
baseline fitted on frozen pooled features (a function of the backbones' pooled outputs, e.g.
linear or kernel CCA). The score needs no reference captions; RefCLIP-S also uses them.

    python -m dualencoder.evaluation.scoring --scorer outputs/run --pairs pairs.csv --out scored.csv

``pairs.csv`` has columns ``image`` (a path, relative to ``--image_root``), ``caption`` and, optionally,
``references`` (captions separated by ``|``). ``--scorer`` is a model directory, ``untrained``, or
``baseline:<name>`` (fitted on the Flickr8k train features, chosen on dev; :func:`load_scorer`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from data_scripts import ImageTransform
from dualencoder.processing import build_processor

logger = logging.getLogger(__name__)

CLIP_S_WEIGHT = 2.5
REFERENCE_SEPARATOR = "|"
# Names of a dev-selected setting (BASELINES.json "selected") -> the grid attribute it fixes, for the CCA baselines.
_GRID_OF = {"ridge": "ridges", "k": "dims", "power": "powers", "width": "widths", "rank": "ranks"}


# ------------------------------------------------------------------------------------------ the scores
def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, w: float = CLIP_S_WEIGHT) -> torch.Tensor:
    """Row-wise ``w * max(cos(image_i, text_i), 0)`` of two ``[N, D]`` tensors."""
    return w * F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).clamp(min=0)


def reference_similarity(text_embeds: torch.Tensor, reference_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-wise ``max(max_r cos(text_i, r), 0)`` over the references ``[R_i, D]`` of each row (0 without any)."""
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    return torch.stack([(F.normalize(refs.float(), dim=-1) @ text).max().clamp(min=0) if len(refs) else text.new_zeros(())
                        for text, refs in zip(text_embeds, reference_embeds)])


def ref_clip_score(clip_s: torch.Tensor, reference_sim: torch.Tensor) -> torch.Tensor:
    """Harmonic mean of CLIP-S and the reference similarity, 0 where either is 0."""
    total = clip_s + reference_sim
    return torch.where(total > 0, 2 * clip_s * reference_sim / total.clamp(min=1e-12), torch.zeros_like(total))


# ------------------------------------------------------------------------------------------ scorers
@dataclass
class Scorer:
    """Images and captions -> L2-normalised embeddings of one space, in batches; then CLIP-S / RefCLIP-S.

    ``image_features(pixel_values)`` and ``text_features(input_ids, attention_mask)`` embed one
    batch; the processor gives their pixels and token ids (``max_length`` tokens at most).
    """

    image_features: Callable[[torch.Tensor], torch.Tensor]
    text_features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    processor: object
    name: str = "scorer"
    max_length: int = 64
    batch_size: int = 32
    # embeddings computed before (a baseline's, from the feature cache), by resolved image path / caption
    known_images: dict = field(default_factory=dict)
    known_texts: dict = field(default_factory=dict)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """Images (PIL, paths, or datasets ``{"bytes", "path"}`` dicts) -> ``[N, D]``."""
        keys = [str(Path(image).resolve()) if isinstance(image, (str, Path)) else None for image in images]
        return _reuse(keys, images, self.known_images, self._compute_images)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return _reuse(list(texts), texts, self.known_texts, self._compute_texts)

    @torch.no_grad()
    def _compute_images(self, images: Sequence) -> torch.Tensor:
        transform = ImageTransform(self.processor.image_processor, train=False)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([transform.pixels({"bytes": None, "path": str(image)} if isinstance(image, (str, Path))
                                                   else image) for image in images[start:start + self.batch_size]])
            chunks.append(F.normalize(self.image_features(pixels).float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def _compute_texts(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size * 4):
            tokens = self.processor.tokenizer(list(texts[start:start + self.batch_size * 4]), padding="longest",
                                              truncation=True, max_length=self.max_length, return_tensors="pt")
            chunks.append(F.normalize(self.text_features(tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1))
        return torch.cat(chunks)

    def score(self, images: Sequence, captions: Sequence[str], references: Optional[Sequence[Sequence[str]]] = None,
              w: float = CLIP_S_WEIGHT) -> dict[str, torch.Tensor]:
        """``{"clip_score": [N]}``, plus ``"ref_clip_score"`` when references are given (one list per pair).

        Each distinct image (path) and caption is embedded once: a judged set pairs 1,000 images
        with 5,000 captions in ~48,000 ways.
        """
        if len(images) != len(captions) or (references is not None and len(references) != len(captions)):
            raise ValueError("images, captions (and references) need one entry per pair")
        image_keys = [image if isinstance(image, (str, Path)) else index for index, image in enumerate(images)]
        image_rows, image_firsts = _unique(image_keys)
        texts = list(captions) + [r for refs in (references or []) for r in refs]
        text_rows, text_firsts = _unique(texts)
        image_embeds = self.embed_images([images[i] for i in image_firsts])[image_rows]
        text_embeds = self.embed_texts([texts[i] for i in text_firsts])[text_rows]
        caption_embeds = text_embeds[:len(captions)]
        out = {"clip_score": clip_score(image_embeds, caption_embeds, w)}
        if references is not None:
            reference_embeds = text_embeds[len(captions):].split([len(refs) for refs in references])
            out["ref_clip_score"] = ref_clip_score(out["clip_score"], reference_similarity(caption_embeds, reference_embeds))
        return out


def _unique(keys: list) -> tuple[torch.Tensor, list[int]]:
    """(row of each key among the distinct keys, the position of each distinct key's first occurrence)."""
    row_of: dict = {}
    firsts = []
    for position, key in enumerate(keys):
        if key not in row_of:
            row_of[key] = len(firsts)
            firsts.append(position)
    return torch.tensor([row_of[key] for key in keys], dtype=torch.long), firsts


def _reuse(keys: list, items: Sequence, known: dict, compute: Callable) -> torch.Tensor:
    """Embeddings of ``items``: ``known[key]`` where there is one, ``compute`` (in one call) for the rest."""
    missing = [i for i, key in enumerate(keys) if key is None or key not in known]
    fresh = dict(zip(missing, compute([items[i] for i in missing]))) if missing else {}
    return torch.stack([fresh[i] if i in fresh else known[key] for i, key in enumerate(keys)])


def model_scorer(model, processor, name: str = "model", **options) -> Scorer:
    """A scorer from a ``DualEncoderModel`` (its ``get_image_features`` / ``get_text_features``)."""
    model.eval()
    return Scorer(lambda pixels: model.get_image_features(pixel_values=pixels),
                  lambda ids, mask: model.get_text_features(input_ids=ids, attention_mask=mask), processor, name, **options)


def recorded_selection(baselines_json: Optional[str], name: str) -> Optional[dict]:
    """The dev-chosen setting of baseline `name` recorded in a ``BASELINES.json`` (None without a file)."""
    return json.loads(Path(baselines_json).read_text())["results"][name]["selected"] if baselines_json else None


def fit_baseline(name: str, features: dict, selected: Optional[dict] = None, seed: int = 0):
    """Baseline `name` fitted on ``features["train"]``, choosing on ``features["validation"]``.

    ``selected`` (a ``BASELINES.json`` row's ``"selected"``) fixes a CCA baseline's grid to that dev-chosen
    setting, so the fit takes one setting's time instead of the grid's; the result is the same fit.
    """
    from dualencoder.baselines import TrainOptions, build_baseline

    baseline = build_baseline(name, TrainOptions(seed=seed))
    for key, value in (selected or {}).items():
        if key == "val_rsum":
            continue
        if key not in _GRID_OF or not hasattr(baseline, _GRID_OF[key]):
            raise ValueError(f"{name}: cannot fix {key!r}; a selected setting applies to the CCA baselines only")
        setattr(baseline, _GRID_OF[key], (value,))
    train = features["train"]
    baseline.fit(train.images, train.texts, train.text_to_image, val=features["validation"])
    logger.info("%s fitted in %.0f s, selected on dev: %s", name, baseline.train_seconds, baseline.selected)
    return baseline


def baseline_scorer(name: str, data_dir, selected: Optional[dict] = None, seed: int = 0, **options) -> Scorer:
    """A frozen-feature baseline, fitted on ``data_dir``'s train features and chosen on its dev features.

    The frozen backbones are the feature cache's (:mod:`dualencoder.baselines.features`); each image
    and caption is embedded as ``baseline.embed_*(pooled features)``, the pooled features read from
    that cache for the data set's own images and captions (computed once, as for the baselines). ``selected``
    (a ``BASELINES.json`` row's ``"selected"``) fixes a CCA baseline's grid to that dev-chosen
    setting, so the fit takes one setting's time instead of the grid's; the result is the same fit.
    """
    from dualencoder.baselines import load_features
    from backbones_dualencoder import OFFLINE_TEXT, OFFLINE_VISION
    from modeling_dualencoder import DualEncoderModel

    features = load_features(data_dir, max_length=options.get("max_length", 64))
    baseline = fit_baseline(name, features, selected, seed)
    # The pooled features of every image and caption of the data set are cached: their embeddings need
    # no backbone (images are matched by file, under data_dir only); anything else runs the backbones.
    wanted = {image_id for split in features.values() for image_id in split.image_ids}
    files = {path.name: str(path.resolve()) for path in Path(data_dir).rglob("*") if path.name in wanted}
    known_images, known_texts = {}, {}
    for split in features.values():
        for image_id, embedding in zip(split.image_ids, baseline.embed_images(split.images)):
            if image_id in files:
                known_images[files[image_id]] = embedding
        known_texts.update(zip(split.captions, baseline.embed_texts(split.texts)))
    backbone = DualEncoderModel.from_vision_text_pretrained(OFFLINE_VISION, OFFLINE_TEXT).eval()
    return Scorer(lambda pixels: baseline.embed_images(backbone.encode_vision(pixels)),
                  lambda ids, mask: baseline.embed_texts(backbone.encode_text(ids, mask)),
                  build_processor(backbone.config), f"baseline:{name}", known_images=known_images,
                  known_texts=known_texts, **options)


def load_scorer(spec: str, data_dir=None, baselines_json: Optional[str] = None, seed: int = 0, **options) -> Scorer:
    """``untrained`` (offline backbones, random heads, ``seed``), ``baseline:<name>`` or a model directory.

    With ``baselines_json`` a baseline is refitted at the setting recorded there (chosen on dev).
    """
    if spec == "untrained":
        from dualencoder.evaluation.common import load_zero_shot

        model, processor = load_zero_shot(device="cpu", seed=seed)
        return model_scorer(model, processor, spec, **options)
    if spec.startswith("baseline:"):
        name = spec.split(":", 1)[1]
        if data_dir is None:
            raise ValueError("a baseline scorer needs the data set its features come from (data_dir)")
        return baseline_scorer(name, data_dir, recorded_selection(baselines_json, name), seed, **options)
    from modeling_dualencoder import DualEncoderModel

    model = DualEncoderModel.from_pretrained(spec)
    return model_scorer(model, build_processor(model.config), spec, **options)


# ------------------------------------------------------------------------------------------ command
def read_pairs(path, image_root=None) -> tuple[list, list, Optional[list]]:
    """(image paths, captions, references or None) of a CSV with columns image, caption[, references]."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"image", "caption"} <= set(rows[0]):
        raise ValueError(f"{path}: needs a header with columns image, caption[, references]")
    root = Path(image_root) if image_root else Path(path).parent
    images = [str(root / row["image"]) for row in rows]
    captions = [row["caption"] for row in rows]
    references = None
    if "references" in rows[0]:
        references = [[r.strip() for r in (row["references"] or "").split(REFERENCE_SEPARATOR) if r.strip()]
                      for row in rows]
    return images, captions, references


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorer", required=True, help="a model directory, 'untrained', or 'baseline:<name>'")
    parser.add_argument("--pairs", required=True, help="CSV with columns image, caption[, references ('|'-separated)]")
    parser.add_argument("--image_root", default=None, help="folder the image paths are relative to (default: the CSV's)")
    parser.add_argument("--out", default=None, help="CSV to write: the pairs with their scores added")
    parser.add_argument("--w", type=float, default=CLIP_S_WEIGHT, help="CLIP-S weight (the paper's 2.5)")
    parser.add_argument("--data", default=None, help="data set of a baseline scorer's features (Flickr8k layout)")
    parser.add_argument("--baselines_json", default=None, help="refit a baseline at the setting recorded here")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    images, captions, references = read_pairs(args.pairs, args.image_root)
    scorer = load_scorer(args.scorer, args.data, args.baselines_json, max_length=args.max_length,
                         batch_size=args.batch_size)
    scores = scorer.score(images, captions, references, w=args.w)
    if args.out:
        with open(args.pairs, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for i, row in enumerate(rows):
            row.update({key: f"{values[i].item():.6f}" for key, values in scores.items()})
        with open(args.out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = {key: values.mean().item() for key, values in scores.items()}
    print(json.dumps({"scorer": args.scorer, "pairs": len(captions), **summary}, indent=2))
    return scores


if __name__ == "__main__":
    main()
