"""What a saliency method explains in a model's output, and how the metrics score it again.

A target ties the saliency methods and the explanation metrics to one kind of model, so that
neither needs to know what the model outputs:

* while a method runs the model's own forward pass, the target's :meth:`~ExplanationTarget.captures`
  name the modules whose output (or input) it needs, recorded with forward hooks;
* :meth:`~ExplanationTarget.select` turns what was recorded into :class:`TargetScores`: for each
  image the explained class, the differentiable score whose gradient Grad-CAM uses, the confidence
  Y the metrics compare against and, for detectors, the explained box;
* :meth:`~ExplanationTarget.confidences` scores the same target on other images: the explanation
  images E = S * I (giving O) and the RISE deletion/insertion sequences.

:class:`ClassificationTarget` explains a class of a classifier such as FALClassifier; detectors'
targets (the image's top detection) are in :mod:`fal_d2.explain.detection_targets`.
:func:`fal_d2.explain.build_target.build_target` picks the one that fits a model.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .faithfulness import predict_scores

__all__ = [
    "Capture",
    "TargetScores",
    "ExplanationTarget",
    "ClassificationTarget",
    "check_target_classes",
]


@dataclass(frozen=True)
class Capture:
    """A module whose output (or, with ``inputs``, whose ``(args, kwargs)``) a target records."""

    module: nn.Module
    inputs: bool = False
    transform: Optional[Callable[[Any], Any]] = None  # applied to what is recorded


@dataclass
class TargetScores:
    """The explained target of each image of a batch."""

    classes: torch.Tensor  # (N,) int64 explained class; -1 where there is nothing to explain
    scores: torch.Tensor  # (N,) differentiated scores (in the autograd graph if gradients are on)
    confidence: torch.Tensor  # (N,) float32 Y on the unmodified input; 0 where nothing is explained
    boxes: Optional[torch.Tensor] = None  # (N, 4) XYXY in model-input pixels (detectors); NaN: none
    probabilities: Optional[torch.Tensor] = None  # (N, K) class probabilities (classifiers)

    @property
    def explained(self) -> torch.Tensor:
        """(N,) bool: whether the image has a target."""
        return self.classes >= 0


class ExplanationTarget:
    """
    Base class of targets; built for one model as ``Target(model)``, which raises ``TypeError``
    when the model is not of the kind the target explains.
    """

    task = ""  # "classification" or "detection": which dataset mapper feeds the model
    uses_image_labels = False  # the dataset's image-level "label" is the class of the image
    chunk_size = 32  # images per forward pass when re-scoring perturbed images
    level_hint = ""  # why a level may not influence the score, for error messages

    def __init__(self, model: nn.Module):
        self.model = model

    def captures(self) -> Dict[str, Capture]:
        """``{name: Capture}`` of what :meth:`select` reads (besides "features", always there)."""
        raise NotImplementedError

    def select(
        self,
        captured: Dict[str, Any],
        target_classes: Optional[torch.Tensor],
        image_sizes: Sequence[Tuple[int, int]],
    ) -> TargetScores:
        """
        Args:
            captured: what :meth:`captures` named, recorded during the forward pass, plus
                "features" (the backbone's output dict).
            target_classes: (N,) classes to explain, or None for the model's own prediction.
            image_sizes: each image's (height, width) as fed to the model.
        """
        raise NotImplementedError

    def confidences(
        self,
        images: Sequence[torch.Tensor],
        classes: Sequence[int],
        boxes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        (T,) confidence of the model in each image's target (O), without gradients.

        Args:
            images: CHW pixel-space images as fed to the model (e.g. E = S * I).
            classes: the explained class of each image; boxes: (T, 4) the explained boxes
                (detectors), in the images' pixels.
        """
        raise NotImplementedError

    def score_levels(self) -> Optional[List[str]]:
        """Backbone outputs that can influence the score, or None if the target cannot tell."""
        return None


def check_target_classes(target_classes, num_images: int, num_classes: int, device) -> torch.Tensor:
    """``target_classes`` as an (N,) int64 tensor, after checking its length and range."""
    targets = torch.as_tensor(target_classes, dtype=torch.int64, device=device).reshape(-1)
    if targets.numel() != num_images:
        raise ValueError(f"{targets.numel()} target classes for {num_images} images")
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < num_classes):
        raise ValueError(f"target classes {targets.tolist()} outside [0, {num_classes})")
    return targets


class ClassificationTarget(ExplanationTarget):
    """
    A class of a classifier with ``backbone`` and ``head`` (features -> (N, K) logits) whose
    inference outputs carry "scores", as :class:`fal_d2.modeling.FALClassifier`.

    The explained score is the pre-softmax logit of the target class, as in Grad-CAM: the softmax
    couples the classes, so its gradient for one class also carries the other classes' evidence.
    Y and O are softmax probabilities of the target class. Without target classes, each image's
    predicted class is explained.
    """

    task = "classification"
    uses_image_labels = True
    level_hint = "not used by the head, see MODEL.CLS_HEAD.IN_FEATURES"

    def __init__(self, model: nn.Module):
        if not isinstance(getattr(model, "head", None), nn.Module):
            raise TypeError(
                f"the model ({type(model).__name__}) has no 'head' module; saliency methods need "
                f"model.backbone and model.head (classifiers), or a GeneralizedRCNN or RetinaNet"
            )
        super().__init__(model)

    def captures(self):
        return {"logits": Capture(self.model.head)}

    def select(self, captured, target_classes, image_sizes):
        logits = captured["logits"]
        num_images, num_classes = logits.shape
        if target_classes is None:
            classes = logits.detach().argmax(dim=1)
        else:
            classes = check_target_classes(target_classes, num_images, num_classes, logits.device)
        rows = torch.arange(num_images, device=logits.device)
        probabilities = logits.detach().float().softmax(dim=1)
        return TargetScores(
            classes=classes,
            scores=logits[rows, classes],
            confidence=probabilities[rows, classes],
            probabilities=probabilities,
        )

    def confidences(self, images, classes, boxes=None):
        scores = predict_scores(self.model, list(images), self.chunk_size)
        classes = torch.as_tensor(classes, dtype=torch.int64, device=scores.device)
        return scores[torch.arange(len(scores), device=scores.device), classes]
