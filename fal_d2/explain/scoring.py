"""Per-image explanation scores of one saliency method on one batch: Y, O, drop, increase, AUCs.

Shared by :class:`fal_d2.evaluation.ExplanationEvaluator` and ``tools/explain.py`` so that the
evaluator, the CLI and any notebook compute the metrics the same way.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .base import SaliencyMethod
from .faithfulness import deletion_insertion_aucs, predict_scores
from .metrics import drop_per_image, explanation_images, increase_per_image, normalize_saliency

__all__ = ["LevelScores", "ExplanationScores", "score_explanations"]


@dataclass
class LevelScores:
    """One level's (or fused map's) explanation of each image of the batch."""

    saliency: List[torch.Tensor]  # per image, (H, W) in [0, 1] at the model input size
    explanation_confidence: np.ndarray  # O: target probability on E = S * I, (N,)
    drop: np.ndarray  # per-image Average Drop %, (N,)
    increase: np.ndarray  # per-image Increase in Confidence % (0 or 100), (N,)
    deletion_auc: Optional[np.ndarray]  # (N,), None when AUCs are off
    insertion_auc: Optional[np.ndarray]


@dataclass
class ExplanationScores:
    target_classes: torch.Tensor  # (N,) explained class of each image
    confidence: np.ndarray  # Y: target probability on the unmodified image, (N,)
    levels: Dict[str, LevelScores]


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
        target_classes: (N,) classes to explain; None explains the predicted classes.
        auc_steps: steps of the deletion/insertion curves; 0 skips them (they cost
            2 * (auc_steps + 1) forward passes per image and level).
    """
    saliency = method(batched_inputs, target_classes)
    targets = saliency.target_classes.cpu()
    rows = torch.arange(len(targets))
    confidence = saliency.scores.cpu()[rows, targets]
    images = [inputs["image"].to(saliency.scores.device) for inputs in batched_inputs]

    levels = {}
    for level, maps in saliency.maps.items():
        normalized = [
            normalize_saliency(maps[i : i + 1], image_size, saliency.padded_size)[0]
            for i, image_size in enumerate(saliency.image_sizes)
        ]
        explanations = [explanation_images(image, s) for image, s in zip(images, normalized)]
        explanation_confidence = predict_scores(model, explanations).cpu()[rows, targets]
        aucs = (None, None)
        if auc_steps > 0:
            aucs = deletion_insertion_aucs(
                model, images, normalized, targets.tolist(), auc_steps, insertion_baseline
            )
        levels[level] = LevelScores(
            saliency=normalized,
            explanation_confidence=explanation_confidence.numpy(),
            drop=drop_per_image(confidence, explanation_confidence),
            increase=increase_per_image(confidence, explanation_confidence),
            deletion_auc=aucs[0],
            insertion_auc=aucs[1],
        )
    return ExplanationScores(target_classes=targets, confidence=confidence.numpy(), levels=levels)
