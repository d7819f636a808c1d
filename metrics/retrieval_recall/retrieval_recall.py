"""Retrieval Recall@K for image-text dual encoders: an `evaluate` wrapper around `dualencoder.metrics`.

There is one implementation of the protocol, in `dualencoder/metrics.py`; this file only adapts
evaluate's row-by-row input format to it, so numbers from `evaluate.load(...)` and from
`dualencoder.metrics.retrieval_metrics` are identical by construction.
"""

import importlib
import os
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Cross-modal retrieval metrics for data with several captions per image (Flickr8k/30k, COCO):
Recall@1/5/10, median and mean rank for image->text and text->image, and RSUM (the sum of the
six recalls). Image->text: an image's rank is the best rank of any of its captions among all
captions. Text->image: a caption's rank is the rank of its one image among all images.
Rank = 1 + number of WRONG candidates scoring >= the best correct candidate, so ties count
against the model (a constant-similarity model gets R@1 = 0). Recalls are in percent; the
median rank is float(np.median(ranks)).
"""

_KWARGS_DESCRIPTION = """\
Two input layouts, chosen with the config name.

Config "similarity" (default): one example per IMAGE query.
    predictions: list of float, the image's similarity to every text (row of the [Ni, Nt]
        similarity matrix; the same text order in every row).
    references: list of int, indices (columns) of the texts that describe this image. Every
        text must belong to exactly one image.

Config "embeddings": one example per TEXT.
    predictions: list of float, the text's L2-normalised embedding.
    references: int, index of the text's image in `image_embeds`.
    image_embeds (compute kwarg, required): [Ni, D] L2-normalised image embeddings.
    This layout never builds the full similarity matrix, so it suits large test sets.

Other compute kwargs: ks (default (1, 5, 10); extra values add keys), chunk_size (default
1024), device (embeddings config only; default: CUDA if available).

Returns: dict with i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr
t2i_meanr rsum (floats).

Examples:
    >>> metric = evaluate.load("metrics/retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1, 0.5], [0.8, 0.7, 0.6]], references=[[0, 1], [2]])["t2i_r1"]
    66.66666666666666
"""

_CITATION = """\
@article{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  journal={CVPR},
  year={2015}
}
"""

_ROOT_ENV = "DUALENCODER_ROOT"


def _find_repo_root_upwards(start):
    for folder in [start, *start.parents]:
        if (folder / "dualencoder" / "metrics.py").is_file():
            return folder
    return None


def _load_dualencoder_metrics():
    """Import `dualencoder.metrics` although evaluate runs this file from a cache copy.

    evaluate copies this script to its modules cache before importing it, so `__file__` does
    not point into the repository. Tried in order: a plain import (works whenever the repo root
    is on sys.path, e.g. commands run from the root as documented); the DUALENCODER_ROOT
    environment variable; the current directory and its parents.
    The import goes through importlib rather than an `import` line because evaluate scans the
    script's top-level imports and would ask to pip-install a package called `dualencoder`.
    """
    try:
        return importlib.import_module("dualencoder.metrics")
    except ImportError as error:
        first_error = error

    candidates = []
    if os.environ.get(_ROOT_ENV):
        candidates.append(Path(os.environ[_ROOT_ENV]).expanduser().resolve())
    found = _find_repo_root_upwards(Path.cwd().resolve())
    if found is not None:
        candidates.append(found)
    for root in candidates:
        if not (root / "dualencoder" / "metrics.py").is_file():
            continue
        sys.path.insert(0, str(root))
        sys.modules.pop("dualencoder", None)
        try:
            return importlib.import_module("dualencoder.metrics")
        except ImportError:
            sys.path.remove(str(root))

    raise ImportError(
        "metrics/retrieval_recall needs the `dualencoder` package of the dual-encoder repository, "
        f"which could not be imported ({first_error}). Run from the repository root, add it to "
        f"PYTHONPATH, or set {_ROOT_ENV}=/path/to/the/repository."
    ) from first_error


_impl = _load_dualencoder_metrics()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@K / median rank / mean rank / RSUM for image<->text retrieval."""

    def _info(self):
        if self.config_name == "embeddings":
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            )
        elif self.config_name in ("default", "similarity"):
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            )
        else:
            raise ValueError(
                f"Unknown config {self.config_name!r} for retrieval_recall: "
                "use 'similarity' (default) or 'embeddings'."
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=["https://arxiv.org/abs/1412.2306"],
        )

    def _compute(
        self, predictions, references, ks=(1, 5, 10), chunk_size=1024, image_embeds=None, device=None
    ):
        if self.config_name == "embeddings":
            if image_embeds is None:
                raise ValueError(
                    "the 'embeddings' config needs compute(..., image_embeds=[Ni, D] array)"
                )
            return _impl.retrieval_metrics(
                np.asarray(image_embeds),
                np.asarray(predictions, dtype=np.float32),
                np.asarray(references, dtype=np.int64),
                ks=ks,
                chunk_size=chunk_size,
                device=device,
            )

        if image_embeds is not None:
            raise ValueError(
                "image_embeds is only used by the 'embeddings' config: "
                "evaluate.load('metrics/retrieval_recall', 'embeddings')"
            )
        sim = np.asarray(predictions, dtype=np.float32)
        if sim.ndim != 2:
            raise ValueError(
                "predictions must be similarity rows of equal length (one per image, one score "
                "per text)"
            )
        num_texts = sim.shape[1]
        text_to_image = np.full(num_texts, -1, dtype=np.int64)
        for image_index, text_indices in enumerate(references):
            for t in text_indices:
                if not 0 <= t < num_texts:
                    raise ValueError(
                        f"references[{image_index}] contains text index {t}, but predictions "
                        f"rows have {num_texts} texts"
                    )
                if text_to_image[t] != -1:
                    raise ValueError(
                        f"text {t} is listed for images {text_to_image[t]} and {image_index}; "
                        "every text must belong to exactly one image"
                    )
                text_to_image[t] = image_index
        orphans = np.flatnonzero(text_to_image < 0)
        if orphans.size:
            raise ValueError(
                f"{orphans.size} text(s) belong to no image (first: {orphans[:10].tolist()}); "
                "every column of the similarity rows needs one image in references"
            )
        i2t, t2i = _impl.ranks_from_similarity(sim, text_to_image, chunk_size=chunk_size)
        return _impl.metrics_from_ranks(i2t, t2i, ks=ks)
