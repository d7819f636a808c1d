"""Every figure of a trained model, from its output directory.

    python -m dualencoder.evaluation.figures --model_dir outputs/default --dataset synthetic --out doc/figures

Writes, into `--out`:

* `tsne_before_after.png`, `pca_before_after.png`: images and captions projected together, for the
  untrained baseline (pretrained backbones + fresh heads: the "before") and the trained model
  (`tsne.png`/`pca.png`, trained model only, with `--no_baseline`);
* `text_to_image.png`, `image_to_text.png`: retrieval galleries for a few random queries;
* `similarity_histogram.png` (and `similarity_histogram_before.png`): aligned vs misaligned
  cosine similarities, the gap in the title;
* `training_curves.png`: loss, logit scale, learning rate and validation recalls from
  `<model_dir>/log_history.json` (skipped when the directory has none, e.g. a Hub id).

The plots themselves live in `dualencoder.visualize`; this module only feeds them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from dualencoder.evaluation.embed import EmbeddedSplit
from dualencoder.evaluation.common import (
    LazyImages,
    add_data_arguments,
    add_zero_shot_arguments,
    data_options,
    embed,
    load_model,
    load_split,
    load_zero_shot,
    zero_shot_backbones,
)
from dualencoder.visualize import (
    plot_embedding_projection,
    plot_image_to_text_gallery,
    plot_projection_before_after,
    plot_similarity_histogram,
    plot_text_to_image_gallery,
    plot_training_curves,
    sample_similarities,
)

logger = logging.getLogger(__name__)


def pick_queries(num_images: int, num_queries: int, seed: int = 0) -> list[int]:
    """A reproducible random sample of image indices used as gallery queries."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_images, size=min(num_queries, num_images), replace=False).tolist())


def gallery_figures(embedded: EmbeddedSplit, images: Sequence, out: Path, *, num_queries: int = 4, k: int = 5,
                    seed: int = 0) -> dict:
    """Text->image (first caption of each sampled image) and image->text galleries."""
    img, txt = embedded.image_embeds.float(), embedded.text_embeds.float()
    t2i = embedded.text_to_image
    chosen = pick_queries(len(img), num_queries, seed)
    first_caption = [int((t2i == i).nonzero()[0]) for i in chosen]
    paths = {}
    paths["text_to_image"] = plot_text_to_image_gallery(
        [embedded.captions[j] for j in first_caption], (txt[first_caption] @ img.T).numpy(), images, chosen,
        out / "text_to_image.png", k=k)
    paths["image_to_text"] = plot_image_to_text_gallery(
        [images[i] for i in chosen], (img[chosen] @ txt.T).numpy(), embedded.captions,
        [set((t2i == i).nonzero().flatten().tolist()) for i in chosen], out / "image_to_text.png", k=k)
    return paths


def similarity_figure(embedded: EmbeddedSplit, path: Path, title: Optional[str] = None) -> float:
    """Histogram of aligned vs misaligned similarities; returns the gap."""
    sims = sample_similarities(embedded.image_embeds, embedded.text_embeds, embedded.text_to_image)
    return plot_similarity_histogram(sims, path, title=title)


def projection_figures(after: EmbeddedSplit, out: Path, before: Optional[EmbeddedSplit] = None, *,
                       methods=("tsne", "pca"), seed: int = 0) -> dict:
    """t-SNE/PCA of images and captions together, side by side with `before` when given."""
    paths = {}
    for method in methods:
        if before is not None:
            paths[f"{method}_before_after"] = plot_projection_before_after(
                (before.image_embeds, before.text_embeds), (after.image_embeds, after.text_embeds),
                after.text_to_image.numpy(), out / f"{method}_before_after.png", method=method,
                titles=("untrained", "trained"), seed=seed)
        else:
            paths[method] = plot_embedding_projection(
                after.image_embeds, after.text_embeds, after.text_to_image.numpy(), out / f"{method}.png",
                method=method, title=f"{method.upper()} of the trained embeddings", seed=seed)
    return paths


def training_curves_figure(model_dir: str, path: Path) -> Optional[Path]:
    """Curves from `<model_dir>/log_history.json`, or None when there is no such file."""
    log_file = Path(model_dir) / "log_history.json"
    if not log_file.is_file():
        logger.warning("%s has no log_history.json: no training curves", model_dir)
        return None
    return plot_training_curves(json.loads(log_file.read_text()), path)


def make_figures(args: argparse.Namespace) -> dict:
    """Every figure for `args.model_dir`; returns {"paths": {name: path}, "gap": ..., "gap_before": ...}."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = data_options(args.model_dir, **vars(args))
    view = load_split(**options)
    show = not args.quiet
    model, processor = load_model(args.model_dir, args.device)
    after = embed(model, processor, view, max_length=options["max_length"], batch_size=args.batch_size,
                  show_progress=show)
    before = None
    if not args.no_baseline:
        config = model.config
        del model
        vision, text = zero_shot_backbones(config, args.vision_model, args.text_model)
        base, base_processor = load_zero_shot(vision, text, args.device, like=config)
        before = embed(base, base_processor, view, max_length=options["max_length"], batch_size=args.batch_size,
                       show_progress=show)
        del base

    paths = projection_figures(after, out, before, seed=args.seed_figures)
    paths.update(gallery_figures(after, LazyImages(view), out, num_queries=args.num_queries, k=args.k,
                                 seed=args.seed_figures))
    result = {"paths": paths, "gap": similarity_figure(after, out / "similarity_histogram.png", "trained")}
    paths["similarity_histogram"] = out / "similarity_histogram.png"
    if before is not None:
        result["gap_before"] = similarity_figure(before, out / "similarity_histogram_before.png", "untrained")
        paths["similarity_histogram_before"] = out / "similarity_histogram_before.png"
    curves = training_curves_figure(args.model_dir, out / "training_curves.png")
    if curves is not None:
        paths["training_curves"] = curves
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dualencoder.evaluation.figures",
        description="t-SNE/PCA before/after, retrieval galleries, similarity histogram and training curves "
                    "of a trained dual encoder.")
    parser.add_argument("--model_dir", required=True, help="a run's output directory (or a Hub model id)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the untrained baseline (no 'before' panels, no second histogram)")
    add_zero_shot_arguments(parser)
    add_data_arguments(parser, max_images=200)
    parser.add_argument("--num_queries", type=int, default=4, help="queries per retrieval gallery")
    parser.add_argument("--k", type=int, default=5, help="results shown per gallery query")
    parser.add_argument("--seed_figures", type=int, default=0, help="seed of the query sample and projections")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = make_figures(args)
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print(f"similarity gap (mean aligned - mean misaligned): trained {result['gap']:.3f}"
          + (f", untrained {result['gap_before']:.3f}" if "gap_before" in result else ""))
    return result



if __name__ == "__main__":
    main()
