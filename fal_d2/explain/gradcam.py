"""Grad-CAM (Selvaraju et al., ICCV 2017) on backbone levels."""
import torch.nn.functional as F

from .base import SaliencyMethod

__all__ = ["GradCAM"]


class GradCAM(SaliencyMethod):
    """
    ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d y_c / d A_k, where A is a level's
    feature map and y_c the target's score (a class logit, see :mod:`fal_d2.explain.targets`).
    """

    def compute_maps(self, features, gradients, classes):
        maps = {}
        for level, activations in features.items():
            weights = gradients[level].mean(dim=(2, 3), keepdim=True)
            maps[level] = F.relu((weights * activations).sum(dim=1))
        return maps
