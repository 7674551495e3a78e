"""Run a model on perturbed images: the model side of the explanation metrics.

What a masked pixel becomes is the mask convention (:data:`MASK_CONVENTIONS`): "normalized" (the
model's pixel mean, i.e. 0 in the normalised tensor the network sees, as pytorch-grad-cam and
TorchCAM mask) or "pixel" (0, black). Deletion removes the most salient pixels first by setting
them to that value; insertion pastes them
first onto a blurred copy of the image, as in RISE (Petsiuk et al., BMVC 2018): a black start would
make insertion measure how the model reacts to black images rather than to the evidence. A zero
insertion baseline can be chosen for comparison with works that use one.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import curve_auc, deletion_scores, explanation_images, insertion_scores
from .mode import explanation_mode

__all__ = [
    "INSERTION_BASELINES",
    "MASK_CONVENTIONS",
    "mask_fill",
    "gaussian_blur",
    "model_outputs",
    "predict_scores",
    "deletion_insertion_aucs",
]

INSERTION_BASELINES = ("blur", "zero")
MASK_CONVENTIONS = ("normalized", "pixel")


def mask_fill(model: nn.Module, convention: str) -> Optional[torch.Tensor]:
    """(C,) pixel value of a masked pixel under ``convention``, or None for black (see above)."""
    if convention not in MASK_CONVENTIONS:
        raise ValueError(f"mask convention {convention!r}; expected one of {MASK_CONVENTIONS}")
    if convention == "pixel":
        return None
    mean = getattr(model, "pixel_mean", None)
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no pixel_mean buffer for the "
                        f"'normalized' mask convention; use 'pixel'")
    return mean.detach().flatten()


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


def model_outputs(
    model: nn.Module, images: Sequence[torch.Tensor], chunk_size: int = 32
) -> List[dict]:
    """
    The model's inference outputs, in eval mode and without gradients, for pixel-space CHW images
    (any dtype), given "height" and "width" equal to the image's own size (so that a detector's
    boxes are in the images' pixels); ``chunk_size`` images at a time to bound memory.
    """
    outputs = []
    with explanation_mode(model), torch.no_grad():
        for start in range(0, len(images), chunk_size):
            inputs = [
                {"image": image, "height": image.shape[-2], "width": image.shape[-1]}
                for image in images[start : start + chunk_size]
            ]
            outputs.extend(model(inputs))
    return outputs


def predict_scores(
    model: nn.Module, images: Sequence[torch.Tensor], chunk_size: int = 32
) -> torch.Tensor:
    """(T, K) softmax scores of a classifier (outputs with "scores"), see :func:`model_outputs`."""
    return torch.stack([output["scores"] for output in model_outputs(model, images, chunk_size)])


def deletion_insertion_aucs(
    target,
    images: Sequence[torch.Tensor],
    saliency: Sequence[torch.Tensor],
    classes: Sequence[int],
    boxes: Optional[torch.Tensor] = None,
    steps: int = 16,
    insertion_baseline: str = "blur",
    fill: Optional[torch.Tensor] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """
    Deletion and insertion AUC of each image's target confidence (see the module docstring).

    Args:
        target: the :class:`fal_d2.explain.targets.ExplanationTarget` whose ``confidences`` score
            the perturbed images (a class probability, or a matched detection's score).
        images: CHW pixel-space images as fed to the model; saliency: matching (H, W) maps.
        classes: each image's explained class; boxes: (N, 4) its explained box (detectors).
        steps: points on each curve after the first (each step changes 1/steps of the pixels).
        fill: (C,) value of deleted pixels (:func:`mask_fill`); None: black. A "zero" insertion
            baseline starts from the same value.

    Returns:
        (deletion_auc, insertion_auc), each (N,): lower deletion and higher insertion are better.
    """
    if insertion_baseline not in INSERTION_BASELINES:
        raise ValueError(
            f"insertion_baseline={insertion_baseline!r}; expected one of {INSERTION_BASELINES}"
        )
    deletion, insertion = [], []
    for i, (image, saliency_map) in enumerate(zip(images, saliency)):
        box = None if boxes is None else boxes[i : i + 1]

        def score_fn(perturbed, cls=int(classes[i]), box=box):
            count = len(perturbed)
            return target.confidences(
                list(perturbed), [cls] * count, None if box is None else box.expand(count, 4)
            )

        if insertion_baseline == "blur":
            baseline = gaussian_blur(image)
        else:
            baseline = explanation_images(image, torch.zeros_like(saliency_map), fill)
        deletion.append(curve_auc(deletion_scores(score_fn, image, saliency_map, steps, fill)))
        insertion.append(
            curve_auc(insertion_scores(score_fn, image, saliency_map, baseline, steps))
        )
    return np.asarray(deletion, dtype=np.float64), np.asarray(insertion, dtype=np.float64)
