"""CLIP-S and RefCLIP-S of (image, caption[, references]) pairs: an `evaluate` wrapper around
`dualencoder.evaluation.scoring`, which holds the one implementation (so both give equal numbers).
"""

import importlib
import os
import sys
from pathlib import Path

import datasets
import evaluate

_DESCRIPTION = """\
Reference-free caption evaluation (Hessel et al., 2021): CLIP-S = w * max(cos(image, caption), 0),
w = 2.5, in the space of a dual encoder. With reference captions, RefCLIP-S = harmonic mean of CLIP-S
and max(max over references of cos(caption, reference), 0). Scores are per pair; the means are
what a captioning system is given.
"""

_KWARGS_DESCRIPTION = """\
Config "default": predictions (list of str, the candidate captions), images (list of str, image paths).
Config "references": also references (list of list of str, each pair's reference captions).

Compute kwargs:
    scorer (required): a `dualencoder.evaluation.scoring.Scorer`, or what `load_scorer` takes: a saved
        DualEncoderModel directory, "untrained", or "baseline:<name>" (then data_dir is needed too).
    w (default 2.5), data_dir, batch_size (default 32), max_length (default 64).

Returns: clip_score (mean) and clip_scores (per pair); with references also ref_clip_score and
ref_clip_scores.

Examples:
    >>> metric = evaluate.load("metrics/clip_score")
    >>> metric.compute(predictions=["a dog runs"], images=["dog.jpg"], scorer="outputs/run")["clip_score"]
"""

_CITATION = """\
@inproceedings{hessel2021clipscore,
  title={{CLIPScore}: A Reference-free Evaluation Metric for Image Captioning},
  author={Hessel, Jack and Holtzman, Ari and Forbes, Maxwell and Le Bras, Ronan and Choi, Yejin},
  booktitle={EMNLP},
  year={2021}
}
"""


def _load_scoring():
    """`dualencoder.evaluation.scoring`, found on sys.path, under $DUALENCODER_ROOT, or above the current directory.

    evaluate runs a cached copy of this file, so its own location says nothing; importlib (not an
    import line) keeps evaluate from asking to pip-install a package named `dualencoder`.
    """
    roots = [os.environ.get("DUALENCODER_ROOT"), *(str(p) for p in [Path.cwd(), *Path.cwd().parents])]
    for root in [None, *roots]:
        if root is not None and not (Path(root) / "dualencoder" / "evaluation" / "scoring.py").is_file():
            continue
        if root is not None and root not in sys.path:
            sys.path.insert(0, root)
        try:
            return importlib.import_module("dualencoder.evaluation.scoring")
        except ImportError:
            continue
    raise ImportError("metrics/clip_score needs the dual-encoder repository: run from its root, put it on "
                      "PYTHONPATH, or set DUALENCODER_ROOT=/path/to/the/repository.")


_scoring = _load_scoring()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClipScore(evaluate.Metric):
    """CLIP-S / RefCLIP-S per pair, and their means."""

    def _info(self):
        features = {"predictions": datasets.Value("string"), "images": datasets.Value("string")}
        if self.config_name == "references":
            features["references"] = datasets.Sequence(datasets.Value("string"))
        elif self.config_name != "default":
            raise ValueError(f"Unknown config {self.config_name!r} for clip_score: use 'default' or 'references'.")
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=datasets.Features(features),
                                   reference_urls=["https://arxiv.org/abs/2104.08718"])

    def _compute(self, predictions, images, references=None, scorer=None, w=_scoring.CLIP_S_WEIGHT, data_dir=None,
                 batch_size=32, max_length=64):
        if scorer is None:
            raise ValueError("compute(..., scorer=<model directory, 'untrained', 'baseline:<name>' or a Scorer>)")
        if isinstance(scorer, str):
            scorer = _scoring.load_scorer(scorer, data_dir, batch_size=batch_size, max_length=max_length)
        scores = scorer.score(list(images), list(predictions), None if references is None else list(references), w=w)
        out = {}
        for key, values in scores.items():
            out[key] = float(values.mean())
            out[key + "s"] = values.tolist()
        return out
