"""Level names in a config checked at setup, against the outputs of the backbone it builds, so
that a typo fails before training rather than at the first evaluation after it."""
from typing import List

import torch

from detectron2.modeling import build_backbone

from fal_d2.task import is_classifier

__all__ = ["backbone_levels", "check_levels"]


def backbone_levels(cfg) -> List[str]:
    """
    The output names of ``cfg``'s backbone. It is built on the meta device: no memory, no
    initialisation, about 50 ms for a ResNet-50 FPN. Building it also checks
    ``MODEL.FAL.ATTENTION_LEVELS`` (an unknown level fails, naming the key).
    """
    with torch.device("meta"):
        return list(build_backbone(cfg).output_shape())


def check_levels(cfg) -> None:
    """Check ``MODEL.FAL.ATTENTION_LEVELS``, ``MODEL.CLS_HEAD.IN_FEATURES`` and, with an
    explanation head, ``MODEL.EXPLAIN_HEAD.LEVELS`` (classifiers) and, when explanations are
    evaluated, ``TEST.EXPLAIN.LEVELS``; one line naming the key."""
    levels = backbone_levels(cfg)
    keys = []
    if is_classifier(cfg):
        keys.append(("MODEL.CLS_HEAD.IN_FEATURES", cfg.MODEL.CLS_HEAD.IN_FEATURES))
        if cfg.MODEL.EXPLAIN_HEAD.ENABLED:
            keys.append(("MODEL.EXPLAIN_HEAD.LEVELS", cfg.MODEL.EXPLAIN_HEAD.LEVELS))
    if cfg.TEST.EXPLAIN.ENABLED:
        keys.append(("TEST.EXPLAIN.LEVELS", cfg.TEST.EXPLAIN.LEVELS))
    for key, values in keys:
        unknown = [value for value in values if value not in levels]
        if unknown or not values:
            problem = f"unknown level(s) {unknown}" if unknown else "no level given"
            raise ValueError(f"{key}: {problem}; the backbone ({cfg.MODEL.BACKBONE.NAME}) "
                             f"produces {levels}")
