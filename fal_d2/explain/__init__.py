"""Saliency methods for FAL/FPN classifiers, explanation metrics and figures.

Every method is built as ``method(model, levels)`` and called as ``method(batched_inputs,
target_classes=None)``; :data:`SALIENCY_METHODS` maps the names used in configs
(``TEST.EXPLAIN.METHODS``) to the classes.
"""
from typing import Sequence

from torch import nn

from .attention import AttentionSaliency
from .base import Saliency, SaliencyMethod, explanation_mode
from .fused import FusedSaliency
from .gradcam import GradCAM
from .gradcampp import GradCAMPlusPlus

__all__ = [
    "SALIENCY_METHODS",
    "AttentionSaliency",
    "FusedSaliency",
    "GradCAM",
    "GradCAMPlusPlus",
    "Saliency",
    "SaliencyMethod",
    "build_saliency_method",
    "explanation_mode",
]

SALIENCY_METHODS = {
    "attention": AttentionSaliency,
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "fused": FusedSaliency,  # of Grad-CAM maps
}


def build_saliency_method(name: str, model: nn.Module, levels: Sequence[str]) -> SaliencyMethod:
    """The method called ``name`` in :data:`SALIENCY_METHODS`, for ``levels`` of ``model``."""
    if name not in SALIENCY_METHODS:
        raise KeyError(
            f"unknown saliency method {name!r}; known methods: {sorted(SALIENCY_METHODS)}"
        )
    return SALIENCY_METHODS[name](model, levels)
