"""Run a classifier on perturbed images: the model side of the explanation metrics.

Deletion removes the most salient pixels first by setting them to 0 (black); insertion pastes them
first onto a blurred copy of the image, as in RISE (Petsiuk et al., BMVC 2018): a black start would
make insertion measure how the model reacts to black images rather than to the evidence. A zero
insertion baseline can be chosen for comparison with works that use one.
"""
import functools
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import explanation_mode
from .metrics import curve_auc, deletion_scores, insertion_scores

__all__ = ["INSERTION_BASELINES", "gaussian_blur", "predict_scores", "deletion_insertion_aucs"]

INSERTION_BASELINES = ("blur", "zero")


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur of (..., C, H, W) images (RISE's insertion start: 11 px, sigma 5)."""
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=images.device)
    offsets = offsets - kernel_size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    shape = images.shape
    x = images.float().reshape(-1, 1, *shape[-2:])
    pad = kernel_size // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(shape)


def predict_scores(
    model: nn.Module, images: Sequence[torch.Tensor], chunk_size: int = 32
) -> torch.Tensor:
    """
    (T, K) softmax scores of the model, in eval mode and without gradients, for pixel-space CHW
    images (any dtype); run ``chunk_size`` images at a time to bound memory.
    """
    scores = []
    with explanation_mode(model), torch.no_grad():
        for start in range(0, len(images), chunk_size):
            inputs = [
                {"image": image, "height": image.shape[-2], "width": image.shape[-1]}
                for image in images[start : start + chunk_size]
            ]
            scores.extend(output["scores"] for output in model(inputs))
    return torch.stack(scores)


def _target_probability(model: nn.Module, target: int, images: torch.Tensor) -> torch.Tensor:
    return predict_scores(model, list(images), chunk_size=len(images))[:, target]


def deletion_insertion_aucs(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    saliency: Sequence[torch.Tensor],
    target_classes: Sequence[int],
    steps: int = 16,
    insertion_baseline: str = "blur",
) -> Tuple[np.ndarray, np.ndarray]:
    """
    Deletion and insertion AUC of each image's target probability (see the module docstring).

    Args:
        images: CHW pixel-space images as fed to the model; saliency: matching (H, W) maps.
        steps: points on each curve after the first (each step changes 1/steps of the pixels).

    Returns:
        (deletion_auc, insertion_auc), each (N,): lower deletion and higher insertion are better.
    """
    if insertion_baseline not in INSERTION_BASELINES:
        raise ValueError(
            f"insertion_baseline={insertion_baseline!r}; expected one of {INSERTION_BASELINES}"
        )
    deletion, insertion = [], []
    for image, saliency_map, target in zip(images, saliency, target_classes):
        score_fn = functools.partial(_target_probability, model, int(target))
        baseline = gaussian_blur(image) if insertion_baseline == "blur" else torch.zeros_like(image)
        deletion.append(curve_auc(deletion_scores(score_fn, image, saliency_map, steps)))
        insertion.append(
            curve_auc(insertion_scores(score_fn, image, saliency_map, baseline, steps))
        )
    return np.asarray(deletion, dtype=np.float64), np.asarray(insertion, dtype=np.float64)
