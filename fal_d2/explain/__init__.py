"""Saliency methods for FAL/FPN classifiers and detectors, explanation metrics and figures.

Every method is built as ``method(model, levels)`` and called as ``method(batched_inputs,
target_classes=None)``; :data:`SALIENCY_METHODS` maps the names used in configs
(``TEST.EXPLAIN.METHODS``) to the classes. What a method explains is the model's target
(:mod:`fal_d2.explain.targets`): a classifier's class logit, or a detector's top detection
(:mod:`fal_d2.explain.detection_targets`).
"""
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .attention import AttentionSaliency
from .base import Saliency, SaliencyMethod, explanation_mode
from .branch import BranchSaliency
from .branch_cam import BranchCAM
from .build_target import build_target
from .detection_targets import DetectionTarget, FastRCNNBoxTarget, RetinaNetAnchorTarget
from .explanation_head import ExplanationHeadSaliency
from .fused import FusedSaliency
from .gradcam import GradCAM
from .gradcampp import GradCAMPlusPlus
from .random_map import RandomSaliency
from .targets import ClassificationTarget, ExplanationTarget, TargetScores
from .visualize import draw_overlay

__all__ = [
    "SALIENCY_METHODS",
    "AttentionSaliency",
    "BranchCAM",
    "BranchSaliency",
    "ClassificationTarget",
    "DetectionTarget",
    "ExplanationHeadSaliency",
    "ExplanationTarget",
    "FastRCNNBoxTarget",
    "FusedSaliency",
    "GradCAM",
    "GradCAMPlusPlus",
    "RandomSaliency",
    "RetinaNetAnchorTarget",
    "Saliency",
    "SaliencyMethod",
    "TargetScores",
    "applicable_levels",
    "build_saliency_method",
    "build_target",
    "draw_overlay",
    "explanation_mode",
]

SALIENCY_METHODS = {
    "attention": AttentionSaliency,  # the branch's attention map M (a feature gate)
    "branch_cam": BranchCAM,  # the branch's class-logit map of the explained class
    "head": ExplanationHeadSaliency,  # the explanation head's map of the explained class
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "fused": FusedSaliency,  # of Grad-CAM maps
    "random": RandomSaliency,  # the control: a smooth random map that explains nothing
}


def build_saliency_method(name: str, model: nn.Module, levels: Sequence[str]) -> SaliencyMethod:
    """The method called ``name`` in :data:`SALIENCY_METHODS`, for ``levels`` of ``model``."""
    if name not in SALIENCY_METHODS:
        raise KeyError(
            f"unknown saliency method {name!r}; known methods: {sorted(SALIENCY_METHODS)}"
        )
    return SALIENCY_METHODS[name](model, levels)


def applicable_levels(
    name: str, model: nn.Module, levels: Sequence[str], target: Optional[ExplanationTarget] = None
) -> Tuple[List[str], Dict[str, str]]:
    """
    The levels among ``levels`` where method ``name`` explains ``model`` (e.g. "attention" only
    where there is a branch), and ``{level: why not}`` for the others, so that a caller can skip
    them and say why. An unknown method fails as in :func:`build_saliency_method`.
    """
    if name not in SALIENCY_METHODS:
        build_saliency_method(name, model, levels)  # raises, naming the known methods
    applicable, reasons = [], {}
    for level in levels:
        try:
            SALIENCY_METHODS[name](model, [level], target=target)
            applicable.append(level)
        except ValueError as error:
            reasons[level] = str(error)
    return applicable, reasons
