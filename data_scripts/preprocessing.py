"""Image transforms derived from the vision backbone's image processor, applied lazily.

The size, mean, std and resampling filter are read from the backbone's HF image processor (e.g.
``ViTImageProcessor``, ``CLIPImageProcessor``) and never re-typed, so the pixels a model is
trained on match the ones it was pretrained on and the ones ``processor(images=...)`` produces
at inference. Transforms run on the fly through ``Dataset.with_transform`` (images are decoded
only when a batch needs them), and return ``pixel_values`` float tensors ``[3, H, W]``.

Training augmentation here is a random resized crop only. A horizontal flip is not part of the
transform: captions say "to the left of" / "on the right" (every two-shape synthetic caption, and
some Flickr8k ones), and a mirrored image would make those captions false. `data_scripts.mirror`
flips only the images none of whose captions name a side (`--flip_augment`). There is no vertical
flip (above/below) and no colour jitter (colours are named in captions). The default crop keeps
at least 60% of the image area, so the objects a caption names stay in view.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .images import open_upright, to_rgb

# The random resized crop's ranges: share of the image's area, and width/height ratio. Also those of
# the crop of cached feature maps (feature_crop.RandomFeatureCrop), the same augmentation there.
CROP_SCALE = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# PIL / transformers' PILImageResampling integer codes -> torchvision modes
_INTERPOLATION = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


@dataclass(frozen=True)
class ImageSpec:
    """What the vision backbone expects, as read from its image processor.

    ``resize`` is ``(height, width)`` for an exact resize, or ``(shortest_edge,)`` to keep the
    aspect ratio; ``crop`` is the centre crop applied after it (None for none).
    """

    resize: tuple[int, ...]
    crop: Optional[tuple[int, int]]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]
    interpolation: InterpolationMode
    rescale_factor: float

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        if len(self.resize) == 2:
            return self.resize
        return (self.resize[0], self.resize[0])

    @classmethod
    def from_processor(cls, processor: Any) -> "ImageSpec":
        """Read an HF image processor (or a processor holding one as ``.image_processor``)."""
        p = getattr(processor, "image_processor", processor)
        size = getattr(p, "size", None)
        if size is None:
            raise ValueError(f"{type(p).__name__} has no 'size': pass the vision backbone's image processor")
        resize = _size_tuple(size)
        crop = None
        if getattr(p, "do_center_crop", False) and getattr(p, "crop_size", None):
            crop = _size_tuple(p.crop_size)
            if len(crop) == 1:
                crop = (crop[0], crop[0])
        if not getattr(p, "do_resize", True):
            raise ValueError(f"{type(p).__name__} has do_resize=False; batches need one fixed image size")
        normalize = getattr(p, "do_normalize", True)
        mean = tuple(float(v) for v in p.image_mean) if normalize else None
        std = tuple(float(v) for v in p.image_std) if normalize else None
        resample = getattr(p, "resample", 3)
        interpolation = _INTERPOLATION.get(int(resample), InterpolationMode.BICUBIC)
        rescale = float(getattr(p, "rescale_factor", 1 / 255)) if getattr(p, "do_rescale", True) else 1.0
        return cls(resize, crop, mean, std, interpolation, rescale)


def _size_tuple(size: Any) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)):
        return tuple(int(v) for v in size)
    if "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    if "shortest_edge" in size:
        return (int(size["shortest_edge"]),)
    raise ValueError(f"unsupported image processor size {size!r}: expected height/width or shortest_edge")


class ImageTransform:
    """Turns the ``image`` column of a batch into ``pixel_values`` tensors ``[3, H, W]``.

    Use with ``dataset.with_transform(ImageTransform(image_processor, train=True))``. Other
    columns pass through unchanged; a batch without ``image`` (e.g. cached features) is
    returned as is. ``train=True`` enables the random resized crop unless ``augment=False``.
    With a ``pixel_store`` (``data_scripts.pixel_store``), an image read from a file takes its
    pre-resized pixels from the store instead of decoding the file.
    """

    def __init__(self, image_processor: Any, train: bool = False, augment: bool = True,
                 crop_scale: tuple[float, float] = CROP_SCALE, crop_ratio: tuple[float, float] = CROP_RATIO,
                 pixel_store: Any = None, crop_draw: Any = None):
        self.spec = ImageSpec.from_processor(image_processor)
        self.pixel_store = pixel_store
        # an object with `window(height, width, key)` (data_scripts.feature_crop.RandomFeatureCrop): the crop of
        # the image with that key is drawn from it, per (seed, epoch, key), instead of from the global RNG
        self.crop_draw = crop_draw
        self.train = train
        self.augment = train and augment
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self._geometry = self._build_geometry()

    def _build_geometry(self):
        spec = self.spec
        if self.augment:
            return transforms.RandomResizedCrop(
                spec.output_size, scale=self.crop_scale, ratio=self.crop_ratio, interpolation=spec.interpolation
            )
        steps = [transforms.Resize(spec.resize if len(spec.resize) == 2 else spec.resize[0],
                                   interpolation=spec.interpolation)]
        if spec.crop is not None:
            steps.append(transforms.CenterCrop(spec.crop))
        return transforms.Compose(steps)

    def pixels(self, image: Any, key: Optional[str] = None) -> torch.Tensor:
        """One image (PIL, or a datasets ``{"bytes", "path"}`` dict) -> float tensor ``[3, H, W]``.

        `key` (the image id) picks the image's crop from `crop_draw` when there is one.
        """
        stored = self.pixel_store.image(image) if self.pixel_store is not None else None
        image = stored if stored is not None else to_rgb(_as_pil(image))
        if self.augment and self.crop_draw is not None and key is not None:
            top, left, height, width = self.crop_draw.window(image.height, image.width, key)
            image = F.resized_crop(image, top, left, height, width, list(self.spec.output_size),
                                   interpolation=self.spec.interpolation)
        else:
            image = self._geometry(image)
        tensor = F.pil_to_tensor(image).float() * self.spec.rescale_factor
        if self.spec.mean is not None:
            tensor = F.normalize(tensor, self.spec.mean, self.spec.std)
        return tensor

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "image" not in batch:
            return batch
        out = {key: value for key, value in batch.items() if key != "image"}
        keys = batch.get("image_id") or [None] * len(batch["image"])
        out["pixel_values"] = [self.pixels(image, key) for image, key in zip(batch["image"], keys)]
        return out

    def __repr__(self) -> str:
        store = f", pixel_store={self.pixel_store}" if self.pixel_store is not None else ""
        return f"ImageTransform(train={self.train}, augment={self.augment}, spec={self.spec}{store})"


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # an undecoded datasets.Image value
        if image.get("bytes"):
            return open_upright(io.BytesIO(image["bytes"]))
        if image.get("path"):
            return open_upright(image["path"])
    raise TypeError(f"expected a PIL image or a {{'bytes', 'path'}} dict, got {type(image).__name__}")
