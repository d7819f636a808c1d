"""Zero-shot image classification: the labels are words, the classifier is the text tower.

    python -m dualencoder.apps.classify --model_dir outputs/default --images photos/ --labels cat,dog,bird
    python -m dualencoder.apps.classify --model_dir outputs/default --imagefolder pets/   # pets/cat/*.jpg, pets/dog/*.jpg

Each label becomes prompts from templates ("a photo of a {}.", ...); a label's class embedding is
the mean of its prompts' normalised embeddings, normalised again (CLIP's prompt ensembling), and
an image gets the label whose class embedding is nearest. With `--imagefolder` (one sub-folder per
label, as `datasets`' imagefolder) the true labels are known, so accuracy is printed beside chance.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from dualencoder.apps.encoders import Encoder, add_encoder_arguments, load_encoder
from dualencoder.apps.photos import find_images, open_all

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a {}.",
)


def load_templates(path) -> list[str]:
    """Prompt templates from a text file: one per line, each with one `{}` where the label goes."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [line for line in templates if line.count("{}") != 1]
    if not templates or bad:
        raise SystemExit(f"--templates {path}: expected one template per line, each with exactly one {{}} for the "
                         f"label (e.g. 'a photo of a {{}}.'); " + (f"not so: {bad[0]!r}" if bad else "none found"))
    return templates


def class_embeddings(encoder: Encoder, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[len(labels), D]: per label, the normalised mean of its prompts' embeddings."""
    prompts = [template.format(label) for label in labels for template in templates]
    embeds = encoder.embed_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return embeds / np.linalg.norm(embeds, axis=1, keepdims=True)


def imagefolder_items(folder) -> tuple[list[Path], list[str], list[str]]:
    """(image paths, their labels, the sorted labels) of a folder with one sub-folder of images per label."""
    folder = Path(folder)
    labels = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not labels:
        raise SystemExit(f"--imagefolder {folder}: expected one sub-folder of images per label (e.g. {folder}/cat/, "
                         f"{folder}/dog/); use --images with --labels for a flat folder")
    paths, truth = [], []
    for label in labels:
        found = find_images(folder / label)
        paths += found
        truth += [label] * len(found)
    return paths, truth, labels


def prompt_label(label: str) -> str:
    """A folder name as words: `golden_retriever` -> `golden retriever`."""
    return label.replace("_", " ")


def classify(encoder: Encoder, paths: Sequence[Path], labels: Sequence[str], templates: Sequence[str],
             batch_size: int = 32, show_progress: bool = True) -> tuple[list[dict], list[str]]:
    """One prediction per readable image: {path, label, score (cosine), scores (per label)}; and the skip messages."""
    classes = class_embeddings(encoder, [prompt_label(label) for label in labels], templates)
    predictions, skipped = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="classifying", unit="batch", disable=not show_progress):
        images, opened, errors = open_all(paths[start:start + batch_size])
        skipped += errors
        if not images:
            continue
        scores = encoder.embed_images(images) @ classes.T
        for path, row in zip(opened, scores):
            best = int(row.argmax())
            predictions.append({"path": str(path), "label": labels[best], "score": float(row[best]),
                                "scores": {label: float(s) for label, s in zip(labels, row)}})
    return predictions, skipped


def accuracy(predictions: Sequence[dict], truth: dict) -> dict:
    """Top-1 accuracy over the predictions whose path has a true label, with chance (1 / number of labels)."""
    scored = [p for p in predictions if p["path"] in truth]
    correct = sum(p["label"] == truth[p["path"]] for p in scored)
    labels = len(predictions[0]["scores"]) if predictions else 0
    per_label = Counter(truth[p["path"]] for p in scored)
    return {"images": len(scored), "correct": correct, "accuracy": correct / len(scored) if scored else float("nan"),
            "chance": 1 / labels if labels else float("nan"), "majority": max(per_label.values()) / len(scored)
            if scored else float("nan")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualencoder.apps.classify", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("images (one of)")
    where = data.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", help="a folder of images (recursive); needs --labels")
    where.add_argument("--imagefolder", help="a folder with one sub-folder of images per label (names: the labels)")
    data.add_argument("--labels", help="comma-separated labels, e.g. 'cat,dog,bird' (with --images)")
    parser.add_argument("--templates", default=None,
                        help="a text file of prompt templates, one per line with {} for the label (default: "
                             + "; ".join(repr(t) for t in DEFAULT_TEMPLATES) + ")")
    parser.add_argument("--output_json", default=None, help="write every prediction (and the accuracy) here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-image lines")
    add_encoder_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.imagefolder:
        paths, truth_labels, labels = imagefolder_items(args.imagefolder)
        truth = {str(path): label for path, label in zip(paths, truth_labels)}
    else:
        labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
        if len(labels) < 2:
            raise SystemExit("--images needs --labels with at least two comma-separated labels, e.g. --labels cat,dog")
        paths, truth = find_images(args.images), {}
    if not paths:
        raise SystemExit(f"{args.imagefolder or args.images}: no images found")
    templates = load_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    encoder = load_encoder(args.model_dir, args.backend, args.device)
    predictions, skipped = classify(encoder, paths, labels, templates, args.batch_size, show_progress=not args.quiet)
    for message in skipped:
        print(f"skipped {message}")
    if not args.quiet:
        for p in predictions:
            mark = "" if p["path"] not in truth else ("  ok" if p["label"] == truth[p["path"]] else
                                                      f"  wrong (is {truth[p['path']]})")
            print(f"{p['path']}\t{p['label']}\t{p['score']:.4f}{mark}")
    result = {"labels": labels, "templates": templates, "predictions": predictions, "skipped": skipped}
    if truth:
        result["accuracy"] = acc = accuracy(predictions, truth)
        print(f"accuracy {acc['accuracy']:.1%} ({acc['correct']}/{acc['images']} images, {len(labels)} labels); "
              f"chance {acc['chance']:.1%}, always the most frequent label {acc['majority']:.1%}")
    print(f"{len(predictions)} image(s) classified, {len(skipped)} unreadable skipped")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
