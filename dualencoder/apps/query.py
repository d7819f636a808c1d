"""Search an index of photos by text, or by an example photo; prints the best matches and their scores.

    python -m dualencoder.apps.query --index_dir ~/pictures.index --text "a dog running on the beach"
    python -m dualencoder.apps.query --index_dir ~/pictures.index --image ~/Pictures/dog.jpg --top_k 10

Scores are cosine similarities (1 = same direction), comparable within one model only. The model
is the one the index was made with unless `--model_dir` names another copy of it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dualencoder.apps.encoders import add_encoder_arguments, load_encoder, model_fingerprint
from dualencoder.apps.photo_index import PhotoIndex
from dualencoder.apps.photos import open_rgb
from dualencoder.apps.vector_search import BACKENDS, build_search

logger = logging.getLogger(__name__)


class PhotoSearch:
    """An index, the model that made it and a nearest-neighbour search: text/photo in, (path, score) out."""

    def __init__(self, index_dir, model_dir: Optional[str] = None, backend: str = "torch", device: str = "auto",
                 search: str = "auto"):
        self.index = PhotoIndex.load(index_dir)
        if not self.index.entries:
            raise SystemExit(f"{index_dir}: the index holds no photos (was the folder empty, or every image unreadable?)")
        model_dir = model_dir or self.index.model_dir
        self.index.check_model(model_fingerprint(model_dir), model_dir)
        self.model_dir, self.backend = model_dir, backend
        self.device = device
        self._encoder = None
        self.search = build_search(self.index.embeddings, search)
        self.paths = self.index.paths()

    @property
    def encoder(self):
        """Loaded on first use: 'more like this' from a stored embedding needs no model."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model_dir, self.backend, self.device)
        return self._encoder

    def by_vector(self, vector: np.ndarray, top_k: int) -> list[tuple[int, Path, float]]:
        """(row, path, score) of the `top_k` photos nearest `vector`, best first."""
        scores, rows = self.search.top(vector.reshape(1, -1), top_k)
        return [(int(row), self.paths[row], float(score)) for row, score in zip(rows[0], scores[0])]

    def by_text(self, text: str, top_k: int = 5):
        return self.by_vector(self.encoder.embed_texts([text])[0], top_k)

    def by_image(self, path, top_k: int = 5):
        return self.by_vector(self.encoder.embed_images([open_rgb(path)])[0], top_k)

    def by_row(self, row: int, top_k: int = 5):
        """Photos like the indexed photo at `row` (the photo itself comes first)."""
        return self.by_vector(self.index.embeddings[row], top_k)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """--index_dir, --search and the model options: what a `PhotoSearch` is made from (query and serve)."""
    parser.add_argument("--index_dir", required=True, help="an index made by `python -m dualencoder.apps.index`")
    parser.add_argument("--search", choices=BACKENDS, default="auto",
                        help="nearest-neighbour search: faiss, numpy, or auto (faiss when installed)")
    add_encoder_arguments(parser, model_required=False, batches=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualencoder.apps.query", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="find photos matching this description")
    what.add_argument("--image", help="find photos like this image file")
    parser.add_argument("--top_k", type=int, default=5, help="how many matches to print (default: 5)")
    add_search_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise SystemExit(f"--top_k {args.top_k}: expected at least 1")
    search = PhotoSearch(args.index_dir, args.model_dir, args.backend, args.device, args.search)
    hits = search.by_text(args.text, args.top_k) if args.text is not None else search.by_image(args.image, args.top_k)
    for _, path, score in hits:
        print(f"{score:.4f}\t{path}")
    return hits


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
