"""Pre-resized uint8 images in one memory-mapped Arrow file, so JPEG decoding leaves the training loop.

An image read from a file costs a JPEG decode (and, for large photos, a big resize) every time a
batch needs it: every epoch, in every DataLoader worker. The pixel store does that work once. Each
distinct image file of the splits is decoded, converted to RGB and shrunk so its shorter side is
`size` pixels (aspect ratio kept, never enlarged), and its raw uint8 pixels go into one Arrow file,
one row per file: `path`, `height`, `width`, `pixels`. Training then memory-maps the file, and
`ImageTransform` (given `pixel_store=`) takes an image's pixels from it by the image's file path
instead of decoding the file; `undecoded_images(dataset)` stops datasets from decoding it first. The random resized crop, resize and normalisation run as before, on
the stored pixels, so keep `size` at or above the model's input size (a crop of 60% of the area is
then upsampled by at most 1.3x at `size` = input size).

The file is keyed by a hash of the image paths (with their sizes and modification times), the size
and the resampling filter, so a changed data set or size builds a new one and a finished one is
reused by later runs. It is written under a temporary name and renamed when complete: a crash never
leaves a partial store behind. Images held in the data set as bytes (the synthetic set) have no path
and are decoded as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm

from .images import images_fingerprint, open_upright, to_rgb, undecoded_images

STORE_VERSION = 2  # 2: EXIF orientation applied, longer side truncated
BATCH_ROWS = 64  # images per Arrow record batch
SCHEMA = pa.schema([("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.binary())])
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


def image_paths(datasets: Iterable[Dataset]) -> list[str]:
    """The distinct file paths of the `image` column of every data set, in first-seen order (no decoding)."""
    seen: dict[str, None] = {}
    for dataset in datasets:
        for value in undecoded_images(dataset)["image"]:
            if value and value.get("path") and not value.get("bytes"):
                seen.setdefault(value["path"], None)
    return list(seen)


def shrink(path: str, size: int, resample: str = "bicubic") -> np.ndarray:
    """One image file -> uint8 RGB array `[H, W, 3]` whose shorter side is `size` (or less, if the file is smaller).

    Upright by its EXIF orientation, as datasets decodes it. The longer side is truncated, not rounded,
    as torchvision's `Resize(size)` does, so a store at the model's input size crops where decoding would.
    """
    try:
        with open_upright(path, shorter_side=size) as opened:
            image = to_rgb(opened)
            width, height = image.size
            scale = size / min(width, height)
            if scale < 1:
                target = (size, max(1, int(height * scale))) if width <= height else (max(1, int(width * scale)), size)
                image = image.resize(target, _RESAMPLE[resample])
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(f"{path}: cannot decode it for the pixel store ({type(exc).__name__}: {exc}). Replace or delete "
                      "the file (with on_bad_image: skip the data loader leaves out files it cannot decode), then "
                      "run again.") from exc


def store_key(datasets: list[Dataset], size: int, resample: str) -> str:
    """A hash of what the store holds: the images (files by path, byte size and mtime), the size and the filter."""
    settings = json.dumps([STORE_VERSION, size, resample, images_fingerprint(datasets)])
    return hashlib.blake2b(settings.encode(), digest_size=8).hexdigest()


def build_pixel_store(datasets: Iterable[Dataset], size: int, directory: str, *, resample: str = "bicubic",
                      num_threads: Optional[int] = None, show_progress: bool = True) -> "PixelStore":
    """The store of every image file of `datasets` at shorter side `size`, built in `directory` unless already there."""
    if size < 1:
        raise ValueError(f"pixel store size must be a positive number of pixels, got {size}")
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose one of {sorted(_RESAMPLE)}")
    datasets = list(datasets)  # read twice: the paths, and the key
    paths = image_paths(datasets)
    if not paths:
        raise ValueError("no image of these data sets is read from a file (they embed their images as bytes), so a "
                         "pixel store has nothing to save: leave pixel_store_size at 0")
    directory = os.path.expanduser(directory)
    file = os.path.join(directory, f"pixels-{size}px-{store_key(datasets, size, resample)}.arrow")
    if not os.path.exists(file):
        os.makedirs(directory, exist_ok=True)
        remove_dead_partials(file)
        partial = f"{file}.partial-{os.getpid()}"
        threads = num_threads or min(8, (os.cpu_count() or 1) * 2)  # PIL releases the GIL while decoding
        try:
            # the Arrow stream format, which datasets memory-maps; record batches of BATCH_ROWS images
            with pa.OSFile(partial, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer, \
                    ThreadPoolExecutor(max_workers=threads) as pool:
                arrays = pool.map(lambda path: shrink(path, size, resample), paths)
                rows = []
                for path, array in tqdm(zip(paths, arrays), total=len(paths), desc=f"pixel store ({size} px)",
                                        unit="img", disable=not show_progress):
                    rows.append((path, array.shape[0], array.shape[1], array.tobytes()))
                    if len(rows) == BATCH_ROWS:
                        writer.write_batch(pa.record_batch([list(c) for c in zip(*rows)], schema=SCHEMA))
                        rows = []
                if rows:
                    writer.write_batch(pa.record_batch([list(c) for c in zip(*rows)], schema=SCHEMA))
            os.replace(partial, file)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return PixelStore(file)


def remove_dead_partials(file: str) -> None:
    """Delete `file.partial-<pid>` files whose writer process is gone (killed mid-build: SIGKILL skips `finally`)."""
    directory, name = os.path.split(file)
    for other in os.listdir(directory):
        prefix, _, pid = other.partition(".partial-")
        if prefix != name or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            os.remove(os.path.join(directory, other))
        except PermissionError:  # alive, another user's
            pass


class PixelStore:
    """The pixels of a store file, looked up by image file path; memory-mapped and cheap to pickle to workers."""

    def __init__(self, file: str):
        self.file = file
        self.dataset = Dataset.from_file(file)  # memory-mapped; pickles as its path
        self.rows = {path: row for row, path in enumerate(self.dataset.data.column("path").to_pylist())}
        self._columns = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {"file": self.file}  # each process memory-maps the file again

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["file"])

    def image(self, image: Any) -> Optional[Image.Image]:
        """The stored RGB image for `image` (a PIL image opened from a file, or a datasets `{"path"}` dict).

        None for an image that came from no file (bytes, or an in-memory image): decode it as usual.
        A file path that the store does not hold raises: the store was built for other data.
        """
        path = image.get("path") if isinstance(image, dict) and not image.get("bytes") else getattr(image, "filename", "")
        if not path:
            return None
        row = self.rows.get(path)
        if row is None:
            raise KeyError(f"{path} is not in the pixel store {self.file} ({len(self)} images), which was built for "
                           "other data. Build the store from the data set you train on (run_contrastive.py does so "
                           "when pixel_store_size is set), or set pixel_store_size to 0.")
        if self._columns is None:
            table = self.dataset.data.table
            self._columns = tuple(table.column(name) for name in ("height", "width", "pixels"))
        height, width, pixels = (column[row] for column in self._columns)
        array = np.frombuffer(pixels.as_buffer(), dtype=np.uint8).reshape(height.as_py(), width.as_py(), 3)
        return Image.fromarray(array)

    def __repr__(self) -> str:
        return f"PixelStore({self.file!r}, {len(self)} images)"
