"""Per-image explanation scores of one saliency method on one batch: Y, O, drop, increase, AUCs.

Shared by :class:`fal_d2.evaluation.ExplanationEvaluator` and ``tools/explain.py`` so that the
evaluator, the CLI and any notebook compute the metrics the same way, for classifiers and
detectors alike: the method's target (:mod:`fal_d2.explain.targets`) says what Y is and scores O.
Images without a target (a detector that detects nothing) are not scored: their entries are NaN
(None for maps) and ``explained`` is False.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .base import SaliencyMethod
from .faithfulness import deletion_insertion_aucs, mask_fill
from .metrics import (
    budget_saliency,
    coverage,
    drop_per_image,
    explanation_images,
    increase_per_image,
    normalize_saliency,
)

__all__ = ["BudgetScores", "LevelScores", "ExplanationScores", "score_explanations"]


@dataclass
class BudgetScores:
    """Average Drop and Increase in Confidence of a map cut to its top pixels (one budget)."""

    explanation_confidence: np.ndarray  # O on E with the budgeted map, (N,)
    drop: np.ndarray  # per-image Average Drop %, (N,)
    increase: np.ndarray  # per-image Increase in Confidence % (0 or 100), (N,)


@dataclass
class LevelScores:
    """One level's (or fused map's) explanation of each image of the batch."""

    saliency: List[Optional[torch.Tensor]]  # per image, (H, W) in [0, 1] at the model input size
    explanation_confidence: np.ndarray  # O: target confidence on E (the whole map), (N,)
    drop: np.ndarray  # per-image Average Drop %, (N,)
    increase: np.ndarray  # per-image Increase in Confidence % (0 or 100), (N,)
    deletion_auc: Optional[np.ndarray]  # (N,), None when AUCs are off
    insertion_auc: Optional[np.ndarray]
    coverage: np.ndarray = None  # (N,) mean of the [0, 1] map
    budgets: Dict[float, BudgetScores] = field(default_factory=dict)  # percent -> scores


@dataclass
class ExplanationScores:
    target_classes: torch.Tensor  # (N,) explained class of each image, -1 where none
    confidence: np.ndarray  # Y: target confidence on the unmodified image, (N,)
    explained: np.ndarray  # (N,) bool: the image had a target and is scored
    boxes: Optional[torch.Tensor]  # (N, 4) explained detections in model-input pixels, or None
    levels: Dict[str, LevelScores]


def _scattered(values, explained: np.ndarray) -> np.ndarray:
    """(N,) float64 with ``values`` at the explained images and NaN elsewhere."""
    result = np.full(len(explained), np.nan)
    result[explained] = values
    return result


def score_explanations(
    model: nn.Module,
    batched_inputs: List[dict],
    method: SaliencyMethod,
    target_classes=None,
    auc_steps: int = 16,
    insertion_baseline: str = "blur",
    mask: str = "normalized",
    budgets: Sequence[float] = (),
    budget_mode: str = "binary",
) -> ExplanationScores:
    """
    Explain a batch with ``method`` and score every level's maps.

    Each map is brought to its image's input size and min-max normalised
    (:func:`normalize_saliency`); the model is run on the explanation images E = S * I for O, on
    those of each budget's map (:func:`budget_saliency`) and, if ``auc_steps`` > 0, on RISE's
    deletion and insertion sequences.

    Args:
        model: the model ``method`` explains.
        target_classes: (N,) classes to explain; None explains the predicted classes (a
            detector's top detections).
        auc_steps: steps of the deletion/insertion curves; 0 skips them (they cost
            2 * (auc_steps + 1) forward passes per image and level).
        mask: what a masked pixel becomes, "normalized" (the mean colour) or "pixel" (black); see
            :func:`fal_d2.explain.faithfulness.mask_fill`.
        budgets: percentages in (0, 100) of top pixels each map is also scored at.
        budget_mode: "binary" (kept pixels at 1: the ranking alone counts) or "valued" (at their
            values, TAME's rule); see :func:`budget_saliency`.
    """
    fill = mask_fill(model, mask)
    saliency = method(batched_inputs, target_classes)
    target = method.target
    classes = saliency.target_classes.cpu()
    explained = saliency.explained.cpu().numpy()
    indices = np.flatnonzero(explained).tolist()
    confidence = saliency.confidence.cpu().double().numpy()
    kept_classes = classes[indices].tolist()
    kept_boxes = None if saliency.boxes is None else saliency.boxes[indices]
    images = [batched_inputs[i]["image"].to(saliency.confidence.device) for i in indices]

    levels = {}
    for level, maps in saliency.maps.items():
        normalized: List[Optional[torch.Tensor]] = [None] * len(classes)
        for i in indices:
            normalized[i] = normalize_saliency(
                maps[i : i + 1], saliency.image_sizes[i], saliency.padded_size
            )[0]
        kept_maps = [normalized[i] for i in indices]
        y = confidence[indices]

        def confidences_on(maps_of_images):
            if not indices:
                return np.zeros(0)
            explanations = [explanation_images(image, s, fill)
                            for image, s in zip(images, maps_of_images)]
            return target.confidences(explanations, kept_classes, kept_boxes).cpu().double().numpy()

        o = confidences_on(kept_maps)
        budget_scores = {}
        for percent in budgets:
            o_budget = confidences_on([budget_saliency(s[None], percent, budget_mode)[0]
                                       for s in kept_maps])
            budget_scores[percent] = BudgetScores(
                explanation_confidence=_scattered(o_budget, explained),
                drop=_scattered(drop_per_image(y, o_budget), explained),
                increase=_scattered(increase_per_image(y, o_budget), explained),
            )
        aucs = (np.zeros(0), np.zeros(0))
        if indices and auc_steps > 0:
            aucs = deletion_insertion_aucs(target, images, kept_maps, kept_classes, kept_boxes,
                                           auc_steps, insertion_baseline, fill)
        # One map at a time: a detector's images in a batch may differ in size.
        kept_coverage = np.array([float(coverage(s[None])[0]) for s in kept_maps])
        levels[level] = LevelScores(
            saliency=normalized,
            explanation_confidence=_scattered(o, explained),
            drop=_scattered(drop_per_image(y, o), explained),
            increase=_scattered(increase_per_image(y, o), explained),
            deletion_auc=_scattered(aucs[0], explained) if auc_steps > 0 else None,
            insertion_auc=_scattered(aucs[1], explained) if auc_steps > 0 else None,
            coverage=_scattered(kept_coverage, explained),
            budgets=budget_scores,
        )
    return ExplanationScores(
        target_classes=classes,
        confidence=np.where(explained, confidence, np.nan),
        explained=explained,
        boxes=None if saliency.boxes is None else saliency.boxes.detach().cpu(),
        levels=levels,
    )
