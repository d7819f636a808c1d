"""Writing a loaded data set as webdataset shards, the input :class:`~data_scripts.streaming.WebDatasetStream` reads.

For data that will outgrow memory later, for the streaming benchmark, and for the tests: each image
becomes ``KEY.<ext>`` (its encoded bytes as they are, never re-encoded) + ``KEY.json`` holding
``{"image_id", "captions"}``, one image's members consecutive, ``images_per_shard`` images a shard.
img2dataset writes the same layout for web-scale data; use it for that.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

from .images import undecoded_images
from .views import convert_view


def write_shards(split, out_dir, images_per_shard: int = 1000, prefix: str = "") -> list[str]:
    """Write ``split`` (a pair- or image-view ``Dataset``) to ``out_dir/{prefix}000000.tar`` ...; return the paths.

    Keys are the image ids with anything but letters, digits, ``-`` and ``_`` replaced by ``_`` (a dot
    would end the key), numbered to stay unique.
    """
    images = undecoded_images(convert_view(split, "images"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar = None
    try:
        for number, row in enumerate(images):
            if number % images_per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(str(out / f"{prefix}{len(paths):06d}.tar"))
                tar = tarfile.open(paths[-1], "w")
            image = row["image"]
            data = image["bytes"] or Path(image["path"]).read_bytes()
            ext = os.path.splitext(image.get("path") or "")[1].lstrip(".").lower() or "png"
            key = f"{number:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', row['image_id'])}"
            meta = json.dumps({"image_id": row["image_id"], "captions": list(row["captions"])}).encode()
            for name, payload in ((f"{key}.{'jpg' if ext == 'jpeg' else ext}", data), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    finally:
        if tar is not None:
            tar.close()
    return paths
