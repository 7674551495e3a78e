"""Pick a model's explanation target: its own module, so that the generic targets
(:mod:`fal_d2.explain.targets`) and the detectors' (:mod:`fal_d2.explain.detection_targets`),
which build on them, do not import each other."""
from torch import nn

from detectron2.modeling import GeneralizedRCNN, RetinaNet

from .detection_targets import FastRCNNBoxTarget, RetinaNetAnchorTarget
from .targets import ClassificationTarget, ExplanationTarget

__all__ = ["build_target"]


def build_target(model: nn.Module) -> ExplanationTarget:
    """The target of ``model``: its top detection for a RetinaNet or a GeneralizedRCNN (and their
    FAL versions), a class logit otherwise."""
    if isinstance(model, RetinaNet):
        return RetinaNetAnchorTarget(model)
    if isinstance(model, GeneralizedRCNN):
        return FastRCNNBoxTarget(model)
    return ClassificationTarget(model)
