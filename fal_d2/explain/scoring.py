"""Per-image explanation scores of one saliency method on one batch: Y, O, drop, increase, AUCs.

Shared by :class:`fal_d2.evaluation.ExplanationEvaluator` and ``tools/explain.py`` so that the
evaluator, the CLI and any notebook compute the metrics the same way, for classifiers and
detectors alike: the method's target (:mod:`fal_d2.explain.targets`) says what Y is and scores O.
Images without a target (a detector that detects nothing) are not scored: their entries are NaN
(None for maps) and ``explained`` is False.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .base import SaliencyMethod
from .faithfulness import deletion_insertion_aucs
from .metrics import drop_per_image, explanation_images, increase_per_image, normalize_saliency

__all__ = ["LevelScores", "ExplanationScores", "score_explanations"]


@dataclass
class LevelScores:
    """One level's (or fused map's) explanation of each image of the batch."""

    saliency: List[Optional[torch.Tensor]]  # per image, (H, W) in [0, 1] at the model input size
    explanation_confidence: np.ndarray  # O: target confidence on E = S * I, (N,)
    drop: np.ndarray  # per-image Average Drop %, (N,)
    increase: np.ndarray  # per-image Increase in Confidence % (0 or 100), (N,)
    deletion_auc: Optional[np.ndarray]  # (N,), None when AUCs are off
    insertion_auc: Optional[np.ndarray]


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
) -> ExplanationScores:
    """
    Explain a batch with ``method`` and score every level's maps.

    Each map is brought to its image's input size and min-max normalised
    (:func:`normalize_saliency`); the model is run on the explanation images E = S * I for O and,
    if ``auc_steps`` > 0, on RISE's deletion and insertion sequences.

    Args:
        model: the model ``method`` explains.
        target_classes: (N,) classes to explain; None explains the predicted classes (a
            detector's top detections).
        auc_steps: steps of the deletion/insertion curves; 0 skips them (they cost
            2 * (auc_steps + 1) forward passes per image and level).
    """
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
        o = np.zeros(0)
        aucs = (np.zeros(0), np.zeros(0))
        if indices:
            explanations = [explanation_images(image, s) for image, s in zip(images, kept_maps)]
            o = target.confidences(explanations, kept_classes, kept_boxes).cpu().double().numpy()
            if auc_steps > 0:
                aucs = deletion_insertion_aucs(target, images, kept_maps, kept_classes, kept_boxes,
                                               auc_steps, insertion_baseline)
        levels[level] = LevelScores(
            saliency=normalized,
            explanation_confidence=_scattered(o, explained),
            drop=_scattered(drop_per_image(y, o), explained),
            increase=_scattered(increase_per_image(y, o), explained),
            deletion_auc=_scattered(aucs[0], explained) if auc_steps > 0 else None,
            insertion_auc=_scattered(aucs[1], explained) if auc_steps > 0 else None,
        )
    return ExplanationScores(
        target_classes=classes,
        confidence=np.where(explained, confidence, np.nan),
        explained=explained,
        boxes=None if saliency.boxes is None else saliency.boxes.detach().cpu(),
        levels=levels,
    )
