"""Random resized crop (Szegedy et al., 2015), as a Detectron2 augmentation of a square image.

Detectron2 v0.6 has crops and resizes but not their combination at a random area and aspect
ratio, the augmentation that from-scratch ImageNet recipes rely on. The crop is resized back to
the input's size, so a batch keeps one shape and the mapper's image cache stays valid.
"""
import math

import numpy as np

from detectron2.data import transforms as T

__all__ = ["RandomResizedCrop", "check_crop_config"]


def check_crop_config(cfg) -> None:
    """One-line errors, naming the key, for a crop scale or ratio that is not a range."""
    scale, ratio = list(cfg.INPUT.CLS.CROP_SCALE), list(cfg.INPUT.CLS.CROP_RATIO)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"INPUT.CLS.CROP_SCALE={scale}: must be [min, max] with 0 < min <= max <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"INPUT.CLS.CROP_RATIO={ratio}: must be [min, max] with 0 < min <= max")


class RandomResizedCrop(T.Augmentation):
    """Crop a random ``scale`` fraction of the area at a random aspect ratio (log-uniform in
    ``ratio``), then resize it back to the image's size. After 10 draws that do not fit, the whole
    image is kept, as torchvision does (with its centre-crop fallback replaced by no crop)."""

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        height, width = image.shape[:2]
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * np.random.uniform(*self.scale)
            aspect = math.exp(np.random.uniform(*log_ratio))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                x0 = np.random.randint(width - crop_w + 1)
                y0 = np.random.randint(height - crop_h + 1)
                return T.TransformList([
                    T.CropTransform(x0, y0, crop_w, crop_h),
                    T.ResizeTransform(crop_h, crop_w, height, width),
                ])
        return T.NoOpTransform()
