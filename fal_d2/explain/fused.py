"""One map from several levels: the levels' maps of another method, normalised and averaged."""
from typing import Sequence, Type

import torch
from torch import nn

from .base import Saliency, SaliencyMethod
from .gradcam import GradCAM
from .metrics import normalize_saliency

__all__ = ["FusedSaliency"]


class FusedSaliency(SaliencyMethod):
    """
    Fusion rule: for each image, each level's map (from ``base_method``) is upsampled to the
    image's input size and min-max normalised to [0, 1] (a constant map counts as 0, see
    :func:`normalize_saliency`), then the levels are averaged with equal weights. Normalising first
    keeps a level with large activations (p2's maps are not on the scale of p5's) from dominating.

    The result has one map, named :attr:`level_name` (e.g. "p2+p3"), at the padded input size;
    the padding is 0.
    """

    def __init__(self, model: nn.Module, levels: Sequence[str],
                 base_method: Type[SaliencyMethod] = GradCAM, target=None):
        super().__init__(model, levels, target)
        self.base = base_method(model, self.levels, self.target)
        self.level_name = "+".join(self.levels)

    @property
    def output_levels(self):
        return [self.level_name]

    def __call__(self, batched_inputs, target_classes=None) -> Saliency:
        saliency = self.base(batched_inputs, target_classes)
        height, width = saliency.padded_size
        fused = torch.zeros((len(saliency.image_sizes), height, width),
                            device=saliency.confidence.device)
        for i, (image_height, image_width) in enumerate(saliency.image_sizes):
            levels = [
                normalize_saliency(level_maps[i : i + 1], (image_height, image_width),
                                   saliency.padded_size)
                for level_maps in saliency.maps.values()
            ]
            fused[i, :image_height, :image_width] = torch.cat(levels).mean(dim=0)
        saliency.maps = {self.level_name: fused}
        return saliency
