"""Random resized crops of cached feature maps: image cropping for a tower whose lower part is cached.

With the vision prefix cache (`run_contrastive.py`, `vision_train: top:N`) each training image
reaches the model as the frozen lower blocks' output, a ``[C, H, W]`` map computed once, so the
random resized crop of `ImageTransform` cannot run: the pixels are never seen again. The frozen
blocks are convolutions, so a window of their output map is (up to the border of the receptive
fields) their output for the same window of the image. `RandomFeatureCrop` therefore cuts a random
window out of the cached map (same area and aspect ranges as the pixel crop) and resizes it back to
``H x W`` bilinearly, the feature-space counterpart of `transforms.RandomResizedCrop`.

Like `RandomMirror`, the window is drawn from a hash of (seed, epoch, image id): no RNG state, so a
resumed run, DataLoader workers and every caption row of one image agree on it (with
``batch_by_image`` the image's rows must carry the same view).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mirror import PerImageDraw
from .preprocessing import CROP_RATIO, CROP_SCALE


class RandomFeatureCrop(PerImageDraw):
    """`crop(features, image_id)`: a random window of a ``[C, H, W]`` map, resized back to ``H x W``.

    ``scale`` bounds the window's share of the map's area, ``ratio`` its width/height ratio (those of
    `ImageTransform`'s pixel crop by default). A draw that does not fit the grid falls back to the
    whole map, as torchvision's crop does.
    """

    def __init__(self, seed: int, scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                 attempts: int = 10):
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        super().__init__(seed)
        self.scale = scale
        self.ratio = ratio
        self.attempts = attempts

    def window(self, height: int, width: int, image_id: str) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the image's window this epoch, on a ``height x width`` grid."""
        generator = torch.Generator().manual_seed(self.draw(image_id, "crop"))
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.attempts):
            u = torch.rand(4, generator=generator).tolist()
            area = height * width * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = round(math.sqrt(area * aspect))
            h = round(math.sqrt(area / aspect))
            if 0 < h <= height and 0 < w <= width:
                return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
        return 0, 0, height, width

    def __call__(self, features: torch.Tensor, image_id: str) -> torch.Tensor:
        height, width = features.shape[-2:]
        top, left, h, w = self.window(height, width, image_id)
        if (h, w) == (height, width):
            return features
        window = features[..., top:top + h, left:left + w].float().unsqueeze(0)
        resized = F.interpolate(window, size=(height, width), mode="bilinear", align_corners=False)
        return resized.squeeze(0).to(features.dtype)

    def __repr__(self) -> str:
        return f"RandomFeatureCrop(seed={self.seed}, epoch={self.epoch}, scale={self.scale}, ratio={self.ratio})"
