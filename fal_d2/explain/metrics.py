"""Explanation-quality metrics as pure functions: tensors or arrays in, numbers out, no model.

Average Drop %, Increase in Confidence % and Win % follow Grad-CAM++ (Chattopadhyay et al., WACV
2018): an explanation map S in [0, 1] masks the image, E = S * I, and the model's confidence Y on I
is compared with its confidence O on E for the same class. S multiplies the normalised image, as in
pytorch-grad-cam and TorchCAM (masked pixels become the mean colour), or the raw pixels (masked
pixels become black); see :func:`explanation_images`. A map that keeps more of the image loses
less confidence, so maps are also compared at fixed budgets (:func:`budget_saliency`): in
the "binary" mode every map keeps the same number of pixels, all at 1, so only its ranking of
pixels counts. Deletion and insertion follow RISE (Petsiuk et al., BMVC 2018): pixels are
removed from (or inserted into) the image in decreasing order of saliency and the target
probability is integrated over the fraction of pixels changed.

Pixels of equal saliency are ranked in a seeded random order (:func:`pixel_ranks`), not in raster
order: Grad-CAM after its ReLU has large zero plateaus, which raster order would sweep from the
top rows down, so a budget or a deletion curve would depend on where the image's content sits.

Per-image functions return one value per image so that callers can keep running sums; the
dataset-level metric is their mean.
"""
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from fal_d2.modeling.map_resize import level_maps_to_images

# How a budget keeps a map's top pixels: at 1 ("binary": the ranking alone counts) or at their
# values ("valued": TAME's rule, where a flatter map keeps more of the image).
BUDGET_MODES = ("binary", "valued")
TIE_BREAK_SEED = 0  # seeds the random order that ranks pixels of equal saliency

__all__ = [
    "BUDGET_MODES",
    "TIE_BREAK_SEED",
    "normalize_saliency",
    "explanation_images",
    "pixel_ranks",
    "budget_saliency",
    "coverage",
    "drop_per_image",
    "increase_per_image",
    "average_drop",
    "increase_in_confidence",
    "win_rate",
    "ranked_pixel_masks",
    "perturbed_images",
    "deletion_scores",
    "insertion_scores",
    "curve_auc",
]


def normalize_saliency(
    saliency: torch.Tensor,
    size: Tuple[int, int],
    padded_size: Optional[Tuple[int, int]] = None,
    output_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """
    Bring (N, h, w) maps of images fed to the model at ``size`` to (N, H, W) = ``output_size``
    (default ``size``) with values in [0, 1], min-max per image.

    Maps computed on a padded batch cover ``padded_size`` (default ``size``): they are upsampled
    (bilinear) to it, then cropped to the image's top-left ``size``, as ImageList pads only the
    bottom and right, then resized (bilinear) to ``output_size``, e.g. the image's own size before
    the model's resize. A constant map carries no localisation and becomes all zeros (a black
    explanation image), so that Average Drop penalises it instead of rewarding it as all ones
    (E = I, no drop) would.
    """
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be (N, h, w), got shape {tuple(saliency.shape)}")
    size = tuple(size)
    padded_size = tuple(padded_size or size)
    output_size = tuple(output_size or size)
    return torch.stack(level_maps_to_images(saliency, padded_size, [size] * len(saliency),
                                            [output_size] * len(saliency), min_max=True))


def explanation_images(
    images: torch.Tensor, saliency: torch.Tensor, fill: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    E = fill + S * (I - fill): the image where S = 1, ``fill`` where S = 0.

    With ``fill`` the model's pixel mean, E normalised is S times the normalised image: the
    convention of pytorch-grad-cam (``multiply_tensor_with_cam``) and TorchCAM, which multiply the
    normalised input tensor. Without it (``fill`` None, or 0), E = S * I in pixel space, so masked
    pixels are black (``MASK_CONVENTIONS`` "pixel").

    Args:
        images: (N, C, H, W) or (C, H, W), uint8 or float pixel values.
        saliency: (N, H, W) or (H, W) in [0, 1], see :func:`normalize_saliency`.
        fill: (C,) pixel value of masked pixels, in the images' channel order.

    Returns:
        float32 images of the same shape as ``images``.
    """
    if images.shape[-2:] != saliency.shape[-2:] or images.dim() != saliency.dim() + 1:
        raise ValueError(
            f"saliency of shape {tuple(saliency.shape)} does not match images of shape "
            f"{tuple(images.shape)}; expected (N, H, W) for (N, C, H, W) or (H, W) for (C, H, W)"
        )
    weights = saliency.to(images.device, torch.float32).unsqueeze(-3)
    if fill is None:
        return images.float() * weights
    fill = fill.to(images.device, torch.float32).view(-1, 1, 1)
    return fill + (images.float() - fill) * weights


def pixel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """
    (N, P) rank of each pixel of (N, ...) maps, flattened: 0 is the most salient. Pixels of equal
    saliency are ranked in one random order of the P positions, drawn from a generator seeded with
    :data:`TIE_BREAK_SEED`: deterministic, and the same for every map of that size, so two maps
    that differ only off their plateaus are ranked alike on them.
    """
    flat = saliency.flatten(1)
    num_pixels = flat.shape[1]
    generator = torch.Generator().manual_seed(TIE_BREAK_SEED)
    shuffle = torch.randperm(num_pixels, generator=generator).to(flat.device)
    # A stable sort of the shuffled pixels keeps equal values in the shuffled order.
    order = shuffle[torch.argsort(flat[:, shuffle], dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    positions = torch.arange(num_pixels, device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def budget_saliency(
    saliency: torch.Tensor, percent: float, mode: str = "binary"
) -> torch.Tensor:
    """
    Keep the ``percent`` % most salient pixels of each map and zero the rest (TAME's evaluation
    at 100, 50 and 15 %): exactly round(percent % of H * W) pixels, ties ranked by
    :func:`pixel_ranks`. ``mode`` "binary" keeps them at 1: every map then keeps the same image
    area, and a monotone rescaling of a map changes nothing, so only the ranking is compared.
    "valued" keeps them at their values (TAME's rule): a flatter map keeps more of the image and
    loses less confidence without ranking pixels any better.

    Args:
        saliency: (N, H, W) maps in [0, 1]; percent: in (0, 100]; mode: one of
            :data:`BUDGET_MODES`.
    """
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode {mode!r}; expected one of {BUDGET_MODES}")
    if not 0 < percent <= 100:
        raise ValueError(f"budget must be in (0, 100], got {percent}")
    count = round(saliency.shape[1:].numel() * percent / 100)
    keep = (pixel_ranks(saliency) < count).view_as(saliency)
    kept = torch.ones_like(saliency) if mode == "binary" else saliency
    return torch.where(keep, kept, torch.zeros_like(saliency))


def coverage(saliency: torch.Tensor) -> torch.Tensor:
    """(N,) mean of each [0, 1] map: how much of the image E keeps. AD and IC reward coverage."""
    return saliency.flatten(1).float().mean(dim=1)


def _as_float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, np.float64)


def _confidences(y, o) -> Tuple[np.ndarray, np.ndarray]:
    y, o = _as_float64(y), _as_float64(o)
    if y.ndim != 1 or y.shape != o.shape:
        raise ValueError(
            f"Y and O must be 1-D with one confidence per image, got shapes {y.shape} and {o.shape}"
        )
    return y, o


def drop_per_image(y, o) -> np.ndarray:
    """100 * max(0, Y - O) / Y per image; 0 where Y = 0 (no confidence left to lose)."""
    y, o = _confidences(y, o)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y > 0, 100.0 * np.maximum(0.0, y - o) / y, 0.0)


def increase_per_image(y, o) -> np.ndarray:
    """100 where the explanation raised the confidence (O > Y), else 0."""
    y, o = _confidences(y, o)
    return 100.0 * (o > y)


def _mean(values: np.ndarray, name: str) -> float:
    if values.size == 0:
        raise ValueError(f"{name} of zero images is undefined")
    return float(values.mean())


def average_drop(y, o) -> float:
    """Average Drop % = 100/N sum_i max(0, Y_i - O_i) / Y_i (lower is better)."""
    return _mean(drop_per_image(y, o), "average_drop")


def increase_in_confidence(y, o) -> float:
    """Increase in Confidence % = 100/N sum_i 1[O_i > Y_i] (higher is better)."""
    return _mean(increase_per_image(y, o), "increase_in_confidence")


def win_rate(drop_a, drop_b) -> float:
    """
    Win % of method A over B: the percentage of images where A's drop is strictly smaller, as in
    Grad-CAM++. A tie is a win for neither, so win_rate(a, b) + win_rate(b, a) is 100 minus the
    percentage of ties (often large: both drops are 0 whenever both explanations raise O).
    """
    drop_a, drop_b = _confidences(drop_a, drop_b)
    return _mean(100.0 * (drop_a < drop_b), "win_rate")


def ranked_pixel_masks(saliency: torch.Tensor, steps: int) -> torch.Tensor:
    """
    (steps + 1, H, W) float masks: mask t is 1 on the round(t / steps * H * W) most salient pixels.
    Equal saliencies are ranked in a seeded random order (:func:`pixel_ranks`): deterministic, and
    a zero plateau is removed (or inserted) scattered over the image, not row by row.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    num_pixels = saliency.numel()
    rank = pixel_ranks(saliency[None])[0]
    counts = torch.round(torch.linspace(0, num_pixels, steps + 1, device=rank.device))
    return (rank[None] < counts[:, None]).float().view(steps + 1, *saliency.shape)


def perturbed_images(start: torch.Tensor, end: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) images showing ``end`` where a mask is 1 and ``start`` elsewhere."""
    masks = masks.to(start.device).unsqueeze(1)
    return start.float()[None] * (1 - masks) + end.float()[None] * masks


def deletion_scores(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    saliency: torch.Tensor,
    steps: int = 16,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    RISE deletion curve: the target score as the most salient pixels are set to ``fill`` ((C,),
    the pixel mean in the normalised convention) or, without it, to 0 (black).

    Args:
        score_fn: (T, C, H, W) pixel-space images -> (T,) target-class probabilities.
        image: (C, H, W) pixel-space image; saliency: (H, W).

    Returns:
        (steps + 1,) scores, from the intact image to the all-removed one.
    """
    masks = ranked_pixel_masks(saliency, steps)
    removed = torch.zeros_like(image, dtype=torch.float32)
    if fill is not None:
        removed = removed + fill.to(image.device, torch.float32).view(-1, 1, 1)
    return score_fn(perturbed_images(image, removed, masks))


def insertion_scores(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    saliency: torch.Tensor,
    baseline: torch.Tensor,
    steps: int = 16,
) -> torch.Tensor:
    """
    RISE insertion curve: the target score as the most salient pixels of ``image`` are pasted
    onto ``baseline`` (RISE uses a blurred copy of the image). Arguments as :func:`deletion_scores`.

    Returns:
        (steps + 1,) scores, from the baseline to the intact image.
    """
    masks = ranked_pixel_masks(saliency, steps)
    return score_fn(perturbed_images(baseline, image, masks))


def curve_auc(scores):
    """
    Area under curves sampled at equally spaced fractions 0, 1/T, ..., 1 of pixels (trapezoid
    rule). ``scores`` is (T + 1,) or (N, T + 1); returns a float or an (N,) array.
    """
    scores = _as_float64(scores)
    if scores.ndim not in (1, 2) or scores.shape[-1] < 2:
        raise ValueError(f"scores must be (T + 1,) or (N, T + 1) with T >= 1, got {scores.shape}")
    steps = scores.shape[-1] - 1
    area = (scores.sum(axis=-1) - (scores[..., 0] + scores[..., -1]) / 2) / steps
    return float(area) if scores.ndim == 1 else area
