"""A control map that explains nothing: smooth random noise, the same for an image every time."""
import hashlib
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .base import Saliency, SaliencyMethod

__all__ = ["RandomSaliency", "image_seed"]

GRID_SIZE = 7  # cells of the coarse noise grid per side, as RISE's 7 x 7 masks


def image_seed(image: torch.Tensor) -> int:
    """A seed from an image's content (its shape and float32 pixel values), so that the same image
    gets the same random map whatever the model, pixel dtype or batch it comes with."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def random_map(seed: int, size: Tuple[int, int]) -> torch.Tensor:
    """(H, W) = ``size``: uniform noise on a GRID_SIZE x GRID_SIZE grid, bilinearly upsampled."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(1, 1, GRID_SIZE, GRID_SIZE, generator=generator)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]


class RandomSaliency(SaliencyMethod):
    """
    The random control: a smooth random map per image, whatever the model, level or class. A map
    that explains nothing still scores some Average Drop; a method that does not beat it does not
    rank pixels better than chance (the model-independent baseline of Sanity Checks for Saliency
    Maps, Adebayo et al., NeurIPS 2018).

    The noise is seeded by :func:`image_seed` and drawn at each image's own size (not a level's,
    whose padded extent would change with the batch), then placed in the padded batch's frame,
    zero on the padding; every level gets the same map. The model still runs once, without a
    backward pass, for the target and its confidence Y.
    """

    needs_gradients = False

    def __call__(self, batched_inputs: List[dict], target_classes=None) -> Saliency:
        saliency = super().__call__(batched_inputs, target_classes)
        maps = torch.zeros((len(batched_inputs), *saliency.padded_size),
                           device=saliency.confidence.device)
        for i, (inputs, (height, width)) in enumerate(zip(batched_inputs, saliency.image_sizes)):
            maps[i, :height, :width] = random_map(image_seed(inputs["image"]), (height, width))
        saliency.maps = {level: maps for level in self.levels}
        return saliency

    def compute_maps(self, features, gradients, classes):
        # The maps depend on the input images, not on the features: __call__ draws them.
        return {}
