"""Image checks at load time and RGB conversion at use time.

Checking means decoding every image once when the data set is loaded, so a corrupt or truncated
file is reported up front with its name instead of crashing a DataLoader worker hours into
training. ``Image.verify()`` alone is not enough: for JPEG it does not read the entropy-coded
data, so a truncated file passes it. We therefore fully decode, using JPEG draft mode (DCT
scaling) so large photos decode at 1/8 size, and a small thread pool (PIL releases the GIL while
decoding). The bytes read are hashed on the way, which finds byte-identical images for free.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .report import Problem

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TINY_SIDE = 8  # px: a side shorter than this is a placeholder or an icon, not a photo (still trained on, with a warning)


def check_image_file(path: str) -> tuple[Optional[str], str, tuple[int, int]]:
    """Decode one image file; return (error message or None, content hash, (width, height))."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})", "", (0, 0)
    error, size = decode_image_bytes(data)
    return error, hashlib.blake2b(data, digest_size=16).hexdigest(), size


def check_image_bytes(data: bytes) -> Optional[str]:
    """Decode one encoded image (at 1/8 size for a JPEG); return an error message, or None when it decodes."""
    return decode_image_bytes(data)[0]


def decode_image_bytes(data: bytes) -> tuple[Optional[str], tuple[int, int]]:
    """Decode one encoded image (at 1/8 size for a JPEG), opened once: (error message or None, its stored
    (width, height) from the header; (0, 0) when it does not decode)."""
    if not data:
        return "file is empty (0 bytes)", (0, 0)
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size  # before draft(), which shrinks a JPEG's size to the decoded one
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"cannot decode image ({type(exc).__name__}: {exc})", (0, 0)
    return None, size


def check_images(
    items: list[tuple[str, str]],
    report_problem: Callable[[Problem], None],
    *,
    desc: str = "Checking images",
    num_threads: Optional[int] = None,
) -> tuple[set[str], list[tuple[str, ...]]]:
    """Decode every ``(image_id, path)``; report each bad one; return (bad ids, duplicate groups).

    ``report_problem`` applies the on_bad_image policy (raises on "error"). Duplicate groups are
    tuples of image ids whose files are byte-identical.
    """
    threads = num_threads or min(8, (os.cpu_count() or 1) * 2)
    bad: set[str] = set()
    by_hash: dict[str, list[str]] = {}
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        results = pool.map(lambda item: check_image_file(item[1]), items)
        tiny = 0
        for (image_id, path), (error, digest, (width, height)) in tqdm(
            zip(items, results), total=len(items), desc=desc, unit="img", leave=False
        ):
            if error is None:
                by_hash.setdefault(digest, []).append(image_id)
                if min(width, height) < TINY_SIDE:
                    tiny += 1
                    logger.warning("%s is %dx%d px (under %d px on a side): it is enlarged to the model's input size "
                                   "and teaches little; replace or delete it.", path, width, height, TINY_SIDE)
                continue
            bad.add(image_id)
            report_problem(
                Problem(path, error, hint="Re-download or replace this file (or delete it and its captions)")
            )
    finally:  # on the first error with on_bad_image="error", do not decode the rest
        pool.shutdown(wait=True, cancel_futures=True)
    if tiny:
        logger.warning("%d of %d images are under %d px on a side (named above).", tiny, len(items), TINY_SIDE)
    duplicates = [tuple(ids) for ids in by_hash.values() if len(ids) > 1]
    return bad, duplicates


def undecoded_images(dataset):
    """`dataset` with its `image` column read as `{"path", "bytes"}`, without decoding.

    datasets fully decodes an `Image` column whenever a row is read (it calls `load()`): anything that
    only needs to know which image a row holds (a fingerprint, a pixel store lookup by path) reads it
    this way instead. A feature change only: no data is rewritten.
    """
    from datasets import Image as ImageFeature

    return dataset.cast_column("image", ImageFeature(decode=False))


def images_fingerprint(datasets) -> str:
    """A hash of the distinct images of the `image` columns as they are now, without decoding any.

    A file counts by its path, byte size and modification time; an image held as bytes by a hash of
    its bytes; each once, in no particular order. Caches built from pixels (the frozen-tower features,
    the pixel store) put it in their key, so replacing an image file, or regenerating a synthetic set at
    another size, is never answered with stale pixels.
    """
    sources = set()
    for dataset in datasets:
        for value in undecoded_images(dataset)["image"]:
            if value.get("bytes"):
                sources.add(hashlib.blake2b(value["bytes"], digest_size=16).digest())
            elif value.get("path"):
                sources.add(value["path"])
    digest = hashlib.blake2b(digest_size=8)
    for source in sorted(sources, key=lambda s: (isinstance(s, str), s)):
        digest.update(file_signature(source) if isinstance(source, str) else source)
    return digest.hexdigest()


def file_signature(path: str) -> bytes:
    """What identifies a file's current content without reading it: path, byte size, modification time."""
    stat = os.stat(path)
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()


def open_upright(source, shorter_side: Optional[int] = None) -> Image.Image:
    """`Image.open(source)` turned upright by its EXIF orientation tag, as datasets' decoder does.

    Phone photos are often stored sideways with a tag saying how to turn them; every path that
    decodes an image file here applies it, so pixels never depend on which path read the file.
    `shorter_side`: a JPEG more than twice that size decodes at 1/2, 1/4 or 1/8 scale (DCT scaling,
    still at least `shorter_side`), for callers that shrink it anyway.
    """
    image = Image.open(source)
    if shorter_side and image.format == "JPEG" and min(image.size) > 2 * shorter_side:
        scale = shorter_side / min(image.size)
        image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 3-channel 8-bit RGB.

    Transparent pixels are composited on white (a plain ``convert("RGB")`` would turn them into
    whatever colour the hidden RGB values hold, often black). 16/32-bit grayscale is rescaled
    rather than clipped. CMYK, palette and grayscale go through PIL's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        arr = arr / hi * 255.0 if hi > 0 else arr
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")
