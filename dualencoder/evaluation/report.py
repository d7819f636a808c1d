"""Qualitative report of a trained model: which pairs it aligns best and worst, which images it confuses.

    python -m dualencoder.evaluation.report --model_dir outputs/default --dataset synthetic --out outputs/default/report

Writes `report.md` into `--out`, with three image grids beside it (`best_pairs.png`,
`worst_pairs.png`, `confused_pairs.png`) that the markdown references:

* best- and worst-aligned pairs: (image, caption) pairs of the split ranked by their cosine
  similarity, at most one pair per image in each list so the grids show different pictures;
* most confused image pairs: for images a != b, how many captions of a rank b first
  (text->image) plus how many captions of b rank a first. High counts in both directions mean
  the model cannot tell the two pictures apart; one direction only, that one image "attracts"
  the other's captions.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dualencoder.evaluation.embed import EmbeddedSplit
from dualencoder.evaluation.common import (
    LazyImages,
    add_data_arguments,
    data_options,
    describe,
    embed,
    load_model,
    load_split,
)
from dualencoder.metrics import format_metrics_table, retrieval_ranks
from dualencoder.visualize import image_grid

logger = logging.getLogger(__name__)


@dataclass
class AlignedPair:
    """One (image, caption) pair of the split; `rank` is the rank of its image for the caption (text->image)."""

    image_index: int
    caption_index: int
    image_id: str
    caption: str
    similarity: float
    rank: int


@dataclass
class ConfusedPair:
    """Images a and b, with how many captions of each rank the other image first."""

    image_a: int
    image_b: int
    id_a: str
    id_b: str
    a_to_b: int
    b_to_a: int
    example_a: Optional[str]  # a caption of a that ranks b first
    example_b: Optional[str]  # a caption of b that ranks a first

    @property
    def count(self) -> int:
        return self.a_to_b + self.b_to_a


def aligned_pairs(embedded: EmbeddedSplit, num_pairs: int = 8, one_per_image: bool = True):
    """The `num_pairs` best- and worst-aligned (image, caption) pairs, by cosine similarity.

    With `one_per_image`, each list holds at most one pair per image (so at most as many pairs as
    images); the best list takes an image's best caption, the worst list its worst.
    """
    img, txt, t2i = embedded.image_embeds.float(), embedded.text_embeds.float(), embedded.text_to_image
    sims = (txt * img[t2i]).sum(1)
    _, ranks = retrieval_ranks(img, txt, t2i, device="cpu")

    def take(order):
        chosen, seen = [], set()
        for j in order.tolist():
            i = int(t2i[j])
            if one_per_image and i in seen:
                continue
            seen.add(i)
            chosen.append(AlignedPair(i, j, str(embedded.image_ids[i]), embedded.captions[j], float(sims[j]),
                                      int(ranks[j])))
            if len(chosen) == num_pairs:
                break
        return chosen

    order = torch.argsort(sims, descending=True, stable=True)
    return take(order), take(order.flip(0))


def top1_images(embedded: EmbeddedSplit, chunk_size: int = 4096) -> torch.Tensor:
    """For every caption, the image it ranks first (text->image), in chunks (an exact tie: the lower index)."""
    img, txt = embedded.image_embeds.float(), embedded.text_embeds.float()
    return torch.cat([(txt[start:start + chunk_size] @ img.T).argmax(1) for start in range(0, len(txt), chunk_size)])


def confused_image_pairs(embedded: EmbeddedSplit, num_pairs: int = 6) -> list[ConfusedPair]:
    """Image pairs whose captions retrieve each other first most often (only pairs with a count > 0).

    Each pair is oriented so that `a_to_b >= b_to_a`, and the list is sorted by the total count,
    then by the smaller direction (mutual confusions first), then by index.
    """
    t2i = embedded.text_to_image
    top1 = top1_images(embedded)
    counts: dict[tuple[int, int], int] = {}
    examples: dict[tuple[int, int], str] = {}
    for j, (a, b) in enumerate(zip(t2i.tolist(), top1.tolist())):
        if a != b:
            counts[(a, b)] = counts.get((a, b), 0) + 1
            examples.setdefault((a, b), embedded.captions[j])
    # each unordered pair once, as (A, B) with A the image whose captions go to B at least as often
    pairs = set()
    for a, b in counts:
        ab, ba = counts[(a, b)], counts.get((b, a), 0)
        pairs.add((a, b) if (ab, -a) > (ba, -b) else (b, a))
    found = [ConfusedPair(a, b, str(embedded.image_ids[a]), str(embedded.image_ids[b]), counts.get((a, b), 0),
                          counts.get((b, a), 0), examples.get((a, b)), examples.get((b, a))) for a, b in pairs]
    found.sort(key=lambda p: (-p.count, -p.b_to_a, p.image_a, p.image_b))
    return found[:num_pairs]


def _cell(text) -> str:
    """Text safe inside a markdown table cell."""
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _pairs_section(title: str, pairs: list[AlignedPair], grid: Optional[str]) -> list[str]:
    lines = [f"## {title}", ""]
    if grid:
        lines += [f"![{title.lower()}]({grid})", ""]
    lines += ["| # | image | caption | similarity | rank of the image |", "| ---: | --- | --- | ---: | ---: |"]
    lines += [f"| {n} | `{_cell(p.image_id)}` | {_cell(p.caption)} | {p.similarity:.3f} | {p.rank} |"
              for n, p in enumerate(pairs, 1)]
    return lines + [""]


def write_report(embedded: EmbeddedSplit, images, out, *, num_pairs: int = 8, num_confused: int = 6,
                 title: str = "Qualitative report", metrics: Optional[dict] = None) -> dict:
    """Write `report.md` and its grids into `out`; `images[i]` is image i of the split (PIL or array).

    Returns {"markdown": path, "grids": {name: path}, "best": [...], "worst": [...], "confused": [...]}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best, worst = aligned_pairs(embedded, num_pairs)
    confused = confused_image_pairs(embedded, num_confused)
    summary = metrics or describe(embedded)
    grids = {}
    for name, pairs in (("best_pairs", best), ("worst_pairs", worst)):
        grids[name] = image_grid([images[p.image_index] for p in pairs],
                                 [f"{p.similarity:.2f}: {p.caption}" for p in pairs], out / f"{name}.png", ncols=4)
    if confused:
        grid_images, labels = [], []
        for n, p in enumerate(confused, 1):
            grid_images += [images[p.image_a], images[p.image_b]]
            labels += [f"{n}A: {p.a_to_b} caption(s) rank {n}B first", f"{n}B: {p.b_to_a} caption(s) rank {n}A first"]
        grids["confused_pairs"] = image_grid(grid_images, labels, out / "confused_pairs.png", ncols=4)  # 2 pairs a row

    gap = summary["similarity"]
    lines = [f"# {title}", "",
             f"{len(embedded.image_ids)} images, {len(embedded.captions)} captions. Similarities are cosine "
             "similarities of the L2-normalised embeddings; ranks start at 1 and ties count against the model.",
             "", format_metrics_table({"model": summary["metrics"]}), "",
             f"Mean similarity of aligned pairs {gap['pos_mean']:.3f}, of misaligned pairs {gap['neg_mean']:.3f}: "
             f"gap {gap['gap']:.3f}.", ""]
    lines += _pairs_section("Best-aligned pairs", best, grids["best_pairs"].name)
    lines += _pairs_section("Worst-aligned pairs", worst, grids["worst_pairs"].name)
    lines += ["## Most confused image pairs", "",
              "Images A and B are confused when a caption of one ranks the other first (text->image); "
              "the counts are over all captions of each image.", ""]
    if confused:
        lines += [f"![most confused image pairs]({grids['confused_pairs'].name})", "",
                  "| # | image A | image B | A's captions ranking B first | B's captions ranking A first | example |",
                  "| ---: | --- | --- | ---: | ---: | --- |"]
        for n, p in enumerate(confused, 1):
            example = f"A: {p.example_a}"  # A's captions go to B at least once (orientation)
            lines.append(f"| {n} | `{_cell(p.id_a)}` | `{_cell(p.id_b)}` | {p.a_to_b} | {p.b_to_a} | "
                         f"{_cell(_short(example))} |")
    else:
        lines.append("No caption ranks a wrong image first: nothing is confused.")
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"markdown": markdown, "grids": grids, "best": best, "worst": worst, "confused": confused}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dualencoder.evaluation.report",
        description="Markdown report of the best- and worst-aligned pairs and the most confused images "
                    "of a trained dual encoder, with image grids.")
    parser.add_argument("--model_dir", required=True, help="a run's output directory (or a Hub model id)")
    parser.add_argument("--out", required=True, help="folder for report.md and its PNG grids")
    parser.add_argument("--num_pairs", type=int, default=8, help="pairs in the best and in the worst list")
    parser.add_argument("--num_confused", type=int, default=6, help="confused image pairs listed")
    add_data_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    options = data_options(args.model_dir, **vars(args))
    view = load_split(**options)
    model, processor = load_model(args.model_dir, args.device)
    embedded = embed(model, processor, view, max_length=options["max_length"], batch_size=args.batch_size,
                     show_progress=not args.quiet)
    title = f"Qualitative report: {args.model_dir} on {options['dataset']} ({options['split']})"
    result = write_report(embedded, LazyImages(view), args.out, num_pairs=args.num_pairs,
                          num_confused=args.num_confused, title=title)
    print(f"wrote {result['markdown']} ({len(result['best'])} best, {len(result['worst'])} worst, "
          f"{len(result['confused'])} confused pairs)")
    return result



if __name__ == "__main__":
    main()
