"""Embed a folder of photos (recursively) into an index that `query` and `serve` search.

    python -m dualencoder.apps.index --model_dir outputs/default --images ~/Pictures --index_dir ~/pictures.index

Run it again after adding, editing or deleting photos: only new or changed files (by path, size
and modification time) are embedded, and removed files are dropped. The index remembers the
model it was made with and refuses another one. Unreadable images are named and skipped.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from tqdm.auto import tqdm

from dualencoder.apps.encoders import add_encoder_arguments, load_encoder, model_fingerprint
from dualencoder.apps.photo_index import PhotoIndex, UpdateReport

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dualencoder.apps.index", description=__doc__.split("\n\n")[0],
        epilog="Supported files: .jpg .jpeg .png .webp .bmp .gif .tif .tiff (any case).")
    parser.add_argument("--images", required=True, help="the folder of photos (searched recursively)")
    parser.add_argument("--index_dir", required=True, help="where the index lives (created on the first run)")
    parser.add_argument("--rebuild", action="store_true", help="start the index afresh (another model or folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_encoder_arguments(parser)
    return parser


def run_index(images: str, index_dir: str, model_dir: str, backend: str = "torch", device: str = "auto",
              batch_size: int = 32, rebuild: bool = False, show_progress: bool = True) -> UpdateReport:
    """Bring the index in `index_dir` up to date with the folder `images`; returns what changed."""
    index = PhotoIndex.open_or_create(index_dir, images, model_dir, model_fingerprint(model_dir), rebuild=rebuild)
    encoder = None

    def embed(pil_images):
        nonlocal encoder
        encoder = encoder or load_encoder(model_dir, backend, device)  # not loaded when nothing changed
        return encoder.embed_images(pil_images)

    progress = (lambda total: tqdm(total=total, desc="embedding photos", unit="img")) if show_progress else None
    report = index.update(embed, batch_size=batch_size, progress=progress)
    index.save()
    return report


def main(argv: Optional[Sequence[str]] = None) -> UpdateReport:
    args = build_parser().parse_args(argv)
    report = run_index(args.images, args.index_dir, args.model_dir, args.backend, args.device, args.batch_size,
                       args.rebuild, show_progress=not args.quiet)
    print(f"{args.index_dir}: {report.summary()}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
