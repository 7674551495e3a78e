"""Grad-CAM++ (Chattopadhyay et al., WACV 2018) on backbone levels."""
import torch
import torch.nn.functional as F

from .base import SaliencyMethod

__all__ = ["GradCAMPlusPlus"]


class GradCAMPlusPlus(SaliencyMethod):
    """
    ReLU(sum_k w_k A_k) with w_k = sum_ij alpha_kij ReLU(g_kij), g = d y_c / d A and the closed form
    for an exponential score exp(y_c):

        alpha_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab g_kij^3)   (0 where the denominator is 0)

    The paper's ReLU(d exp(y_c) / dA) is exp(y_c) ReLU(g): the factor exp(y_c) is the same for every
    channel of an image, so it only scales the map; it is left out to avoid overflow.
    """

    def compute_maps(self, features, gradients, classes):
        maps = {}
        for level, activations in features.items():
            grad = gradients[level]
            grad_squared = grad.pow(2)
            denominator = 2 * grad_squared + activations.sum(dim=(2, 3), keepdim=True) * grad.pow(3)
            denominator = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
            alpha = grad_squared / denominator
            weights = (alpha * F.relu(grad)).sum(dim=(2, 3), keepdim=True)
            maps[level] = F.relu((weights * activations).sum(dim=1))
        return maps
