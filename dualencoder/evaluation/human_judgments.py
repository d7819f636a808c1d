"""How well a scorer agrees with people: Kendall tau-b against the Flickr8K-CF judgments.

    python -m dualencoder.evaluation.human_judgments --scorer baseline:linear-cca \
        --data ../shared/data/flickr8k --out doc/HUMAN_JUDGMENTS.json

Flickr8K-CF (Hodosh et al. 2013; ``Flickr8k_text/CrowdFlowerAnnotations.txt``) holds 47,830
(test image, caption) pairs, each with the share of at least 3 CrowdFlower judges who said the
caption describes the image. The protocol is the CLIPScore paper's (Hessel et al. 2021, appendix A):
Kendall tau-b (``scipy.stats.kendalltau(variant="b")``, times 100) between the scorer's CLIP-S or
RefCLIP-S and that share, over all pairs. An image's references are its own captions minus every
caption judged with it, so no candidate is its own reference. Published, for a CLIP trained on 400M
pairs: CLIP-S 34.4, RefCLIP-S 36.4.

These are test images and report-only data: nothing is trained or chosen on them. Each run adds its
scorer's entry to ``--out`` (JSON) and rewrites the markdown table beside it.

``--scorer reranker:<model_dir>`` scores each pair with the co-attention re-ranker saved in the export
(:mod:`dualencoder.rerank`): its match probability, and the final score re-ranking orders by (ITM logit +
``dual_weight`` x the dual encoder's logit). It has no reference-based variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from scipy.stats import kendalltau

from data_scripts.captions import parse_token_file
from data_scripts.report import DatasetFormatError
from dualencoder.evaluation.scoring import CLIP_S_WEIGHT, load_scorer

logger = logging.getLogger(__name__)

CROWDFLOWER = "Flickr8k_text/CrowdFlowerAnnotations.txt"
TOKENS = "Flickr8k_text/Flickr8k.token.txt"
IMAGES = "Flicker8k_Dataset"
PUBLISHED = {"clip_score": 34.4, "ref_clip_score": 36.4}  # CLIP ViT-B/32, Hessel et al. 2021, Table 2


@dataclass(frozen=True)
class Judgment:
    """One line of CrowdFlowerAnnotations.txt: the image, the judged caption's id, the judges' verdicts."""

    image: str  # file name, e.g. 1056338697_4f7d7ce270.jpg
    caption_id: str  # <image>#<n>: the n-th caption of (possibly another) image
    share_yes: float
    yes: int
    no: int


def read_crowdflower(path) -> list[Judgment]:
    """Parse ``image TAB caption id TAB share of yes TAB yes TAB no`` lines; a malformed line is an error."""
    judgments = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            image, caption_id, share, yes, no = fields
            judgment = Judgment(image.strip(), caption_id.strip(), float(share), int(yes), int(no))
        except ValueError as error:
            raise DatasetFormatError(f"{path}, line {number}: expected image, caption id, share of yes, yes, no "
                                     f"separated by TABs; got {line[:80]!r} ({error})") from error
        if judgment.yes + judgment.no and abs(judgment.share_yes - judgment.yes / (judgment.yes + judgment.no)) > 1e-3:
            raise DatasetFormatError(f"{path}, line {number}: share {share} is not yes / (yes + no) = {yes}/{int(yes) + int(no)}")
        judgments.append(judgment)
    if not judgments:
        raise DatasetFormatError(f"{path}: no judgments")
    return judgments


def judged_pairs(data_dir) -> dict:
    """Images (paths), captions, references and human scores of every Flickr8K-CF pair, in file order."""
    data_dir = Path(data_dir)
    judgments = read_crowdflower(data_dir / CROWDFLOWER)

    def report(problem):
        logger.warning("%s", problem)

    table = parse_token_file(data_dir / TOKENS, report)
    captions_of = {image: {index: " ".join(text.split()) for index, text, _ in entries} for image, entries in table.items()}

    def caption(caption_id: str) -> str:
        image, _, index = caption_id.rpartition("#")
        return captions_of[image][int(index)]

    judged_with: dict[str, set] = {}
    for j in judgments:
        judged_with.setdefault(j.image, set()).add(caption(j.caption_id))
    references = {image: [c for c in captions_of[image].values() if c not in judged] for image, judged in judged_with.items()}
    return {
        "images": [str(data_dir / IMAGES / j.image) for j in judgments],
        "captions": [caption(j.caption_id) for j in judgments],
        "references": [references[j.image] for j in judgments],
        "human": [j.share_yes for j in judgments],
    }


def kendall_tau_b(scores, human) -> float:
    """100 x Kendall tau-b of two score lists (ties in either count as in the paper's scipy call)."""
    return 100.0 * float(kendalltau(torch.as_tensor(scores).tolist(), list(human), variant="b")[0])


def correlations(scorer, pairs: dict, w: float = CLIP_S_WEIGHT) -> dict:
    """Tau-b of the scorer's CLIP-S and RefCLIP-S against the human scores of ``pairs`` (from :func:`judged_pairs`)."""
    scores = scorer.score(pairs["images"], pairs["captions"], pairs["references"], w=w)
    return {f"{key}_tau_b": kendall_tau_b(values, pairs["human"]) for key, values in scores.items()}


def reranker_correlations(model_dir: str, data_dir, pairs: dict, max_length: Optional[int] = None) -> dict:
    """Tau-b of the re-ranker's match probability and final score (a dict per score) against the human scores.

    Captions are cut at `max_length` tokens, by default the training run's (what the re-ranker was trained on).
    """
    from dualencoder.evaluation.common import data_options, load_model, load_split
    from dualencoder.rerank.model import load_reranker, require_reranker
    from dualencoder.rerank.rerank import pair_scores

    require_reranker(model_dir)
    model, processor = load_model(model_dir, "cpu")
    options = data_options(model_dir, dataset=str(data_dir), max_length=max_length)
    view = load_split(**{**options, "split": "test"})
    # the judged captions are whitespace-normalised; the split's own strings are what its tokens are keyed by
    own = {" ".join(c.split()): c for caps in view.select_columns(["captions"]).to_dict()["captions"] for c in caps}
    missing = [c for c in pairs["captions"] if c not in own]
    if missing:
        raise DatasetFormatError(f"{len(missing)} judged caption(s) are not captions of the test split, "
                                 f"e.g. {missing[0]!r}")
    scores = pair_scores(model, processor, load_reranker(model_dir), view, [Path(i).name for i in pairs["images"]],
                         [own[c] for c in pairs["captions"]], max_length=options["max_length"], show_progress=True)
    return {key: {"clip_score_tau_b": kendall_tau_b(values, pairs["human"]), "ref_clip_score_tau_b": None}
            for key, values in scores.items()}


def render_markdown(results: dict) -> str:
    rows = ["| scorer | CLIP-S tau-b | RefCLIP-S tau-b | pairs | seconds | command |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    rows.append(f"| CLIP ViT-B/32, 400M pairs (published) | {PUBLISHED['clip_score']} | {PUBLISHED['ref_clip_score']} "
                "| 47830 | - | Hessel et al. 2021, Table 2 |")
    for name, row in results.items():
        ref = "-" if row["ref_clip_score_tau_b"] is None else f"{row['ref_clip_score_tau_b']:.1f}"
        rows.append(f"| {name} | {row['clip_score_tau_b']:.1f} | {ref} | {row['pairs']} | "
                    f"{row['seconds']:.0f} | `{row['command']}` |")
    return ("# Agreement with human judgments (Flickr8K-CF)\n\n"
            "Generated by `python -m dualencoder.evaluation.human_judgments` from the JSON beside this page "
            "(do not edit by hand). Kendall tau-b x 100 between each scorer's CLIP-S (w = 2.5) or RefCLIP-S and "
            "the share of CrowdFlower judges who said the caption describes the image, over all judged pairs of "
            "the 1,000 Flickr8k test images (the CLIPScore paper's protocol; references: the image's captions "
            "minus those judged with it). Report-only data: nothing was trained or chosen on it. Baselines are "
            "fitted on Flickr8k train features at the setting chosen on dev (doc/BASELINES.json).\n\n"
            + "\n".join(rows) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorer", required=True,
                        help="a model directory, 'untrained', 'baseline:<name>', or 'reranker:<model directory>' (the "
                             "re-ranker saved with that export: its match probability and its final score)")
    parser.add_argument("--data", default="../shared/data/flickr8k", help="Flickr8k directory (official layout)")
    parser.add_argument("--out", default="doc/HUMAN_JUDGMENTS.json", help="JSON to add this scorer's entry to (and .md beside)")
    parser.add_argument("--name", default=None, help="the entry's name (default: --scorer)")
    parser.add_argument("--baselines_json", default=None, help="refit a baseline at the dev-chosen setting recorded here")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens per caption (default: 64; for a re-ranker, its training run's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    started = time.time()
    pairs = judged_pairs(args.data)
    name = args.name or args.scorer
    if args.scorer.startswith("reranker:"):
        found = reranker_correlations(args.scorer.split(":", 1)[1], args.data, pairs, args.max_length)
        entries = {f"{name}, match probability": found["match_probability"],
                   f"{name}, final score (ITM logit + dual_weight x dual logit)": found["final"]}
    else:
        scorer = load_scorer(args.scorer, args.data, args.baselines_json, max_length=args.max_length or 64)
        entries = {name: correlations(scorer, pairs)}
    command = "python -m dualencoder.evaluation.human_judgments " + " ".join(argv if argv is not None else sys.argv[1:])
    entries = {key: {**value, "pairs": len(pairs["human"]), "seconds": time.time() - started, "command": command}
               for key, value in entries.items()}
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved.update(entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=2))
    out.with_suffix(".md").write_text(render_markdown(saved))
    print(json.dumps(entries, indent=2))
    return entries


if __name__ == "__main__":
    main()
