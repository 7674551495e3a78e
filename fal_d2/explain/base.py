"""The saliency-method interface: one method per subclass, run on a model without changing it.

A method is built with ``(model, levels)`` for a model that exposes ``backbone`` (returning a dict
``{level: (N, C, H, W)}``) and whose ``forward`` takes a list of dataset dicts: a classifier such
as :class:`fal_d2.modeling.FALClassifier`, or a detector (GeneralizedRCNN, RetinaNet and their
FAL versions). What is explained is the model's :class:`~fal_d2.explain.targets.ExplanationTarget`
(by default :func:`~fal_d2.explain.build_target.build_target`): a class logit of a classifier, or the
class logit of a detector's top detection (:mod:`fal_d2.explain.detection_targets`).

Calling the method runs the model's own forward once, with hooks on ``backbone`` (its features)
and on the modules the target reads (e.g. the classifier's head), and returns a :class:`Saliency`.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .mode import explanation_mode
from .build_target import build_target
from .targets import ExplanationTarget, TargetScores

__all__ = ["Saliency", "SaliencyMethod", "explanation_mode"]


@dataclass
class Saliency:
    """Saliency maps of one batch, with what is needed to bring them back to the images."""

    maps: Dict[str, torch.Tensor]  # level -> (N, h, w), non-negative, covering the padded batch
    target_classes: torch.Tensor  # (N,) int64, the explained class; -1: nothing explained
    confidence: torch.Tensor  # (N,) Y: the target's confidence on the unmodified input
    image_sizes: List[Tuple[int, int]]  # each image's (height, width) as fed to the model
    padded_size: Tuple[int, int]  # (height, width) of the padded batch the maps cover
    scores: Optional[torch.Tensor] = None  # (N, K) softmax of the unmodified input (classifiers)
    boxes: Optional[torch.Tensor] = None  # (N, 4) explained boxes, model-input pixels (detectors)

    @property
    def explained(self) -> torch.Tensor:
        """(N,) bool: whether the image has a target (a detector may detect nothing)."""
        return self.target_classes >= 0


class _ForwardCapture:
    """
    Hooks that record the backbone's feature dict and what the target names during one forward,
    and optionally make the backbone's input require grad so that, with frozen parameters,
    autograd still records the graph from the image to the score. Removed on exit, also on an
    exception.
    """

    def __init__(self, model: nn.Module, target: ExplanationTarget, input_requires_grad: bool):
        self._model = model
        self._target = target
        self._input_requires_grad = input_requires_grad
        self._handles = []
        self.captured: Dict[str, Any] = {}
        self.padded_size: Optional[Tuple[int, int]] = None

    def __enter__(self):
        backbone = self._model.backbone
        self._handles = [
            backbone.register_forward_pre_hook(self._backbone_input),
            backbone.register_forward_hook(self._backbone_output),
        ]
        for name, capture in self._target.captures().items():
            if capture.inputs:
                hook = capture.module.register_forward_pre_hook(
                    self._recorder(name, capture, inputs=True), with_kwargs=True
                )
            else:
                hook = capture.module.register_forward_hook(self._recorder(name, capture))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, name, capture, inputs=False):
        transform = capture.transform or (lambda value: value)

        def record_inputs(module, args, kwargs):
            self.captured[name] = transform((args, kwargs))

        def record_output(module, args, output):
            self.captured[name] = transform(output)

        return record_inputs if inputs else record_output

    def _backbone_input(self, module, args):
        images = args[0]
        self.padded_size = tuple(images.shape[-2:])
        if self._input_requires_grad:
            return (images.detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def _backbone_output(self, module, args, output):
        self.captured["features"] = output


class SaliencyMethod:
    """
    Base class of saliency methods. Subclasses implement :meth:`compute_maps`; set
    ``needs_gradients = False`` when the maps come from the forward pass alone.

    Explaining runs the model in :func:`explanation_mode` and removes its hooks afterwards, so the
    model's mode, parameters' ``requires_grad`` and hook dicts are as they were, whatever happens.
    """

    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        levels: Sequence[str],
        target: Optional[ExplanationTarget] = None,
    ):
        """
        Args:
            model: a classifier or detector exposing ``backbone`` (see the module docstring).
            levels: backbone outputs to explain, e.g. ``["p2", "p3"]``.
            target: what to explain; default :func:`~fal_d2.explain.build_target.build_target`.
        """
        if not isinstance(getattr(model, "backbone", None), nn.Module):
            raise TypeError(
                f"{type(self).__name__}: the model ({type(model).__name__}) has no 'backbone' "
                f"module; saliency methods need model.backbone"
            )
        try:
            self.target = target if target is not None else build_target(model)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e}") from None
        levels = list(levels)
        valid = list(model.backbone.output_shape())
        unknown = [level for level in levels if level not in valid]
        if unknown or not levels:
            raise ValueError(
                f"{type(self).__name__}: unknown level(s) {unknown or levels}; "
                f"the backbone produces {valid}"
            )
        score_levels = self.target.score_levels()
        unused = [level for level in levels if score_levels is not None
                  and level not in score_levels]
        if self.needs_gradients and unused:
            raise ValueError(
                f"{type(self).__name__}: level(s) {unused} do not influence the explained score "
                f"({self.target.level_hint})"
            )
        self.model = model
        self.levels = levels

    @property
    def output_levels(self) -> List[str]:
        """Names of the maps a call returns: the levels, unless a subclass combines them."""
        return list(self.levels)

    def __call__(self, batched_inputs: List[dict], target_classes=None) -> Saliency:
        """
        Args:
            batched_inputs: dataset dicts with "image" (CHW, pixel space), as the model takes them.
            target_classes: (N,) classes to explain; None explains each image's predicted class
                (a detector's: the class of its top detection).
        """
        image_sizes = [tuple(inputs["image"].shape[-2:]) for inputs in batched_inputs]
        with explanation_mode(self.model), torch.set_grad_enabled(self.needs_gradients):
            with _ForwardCapture(self.model, self.target, self.needs_gradients) as capture:
                self.model(batched_inputs)
            selected = self.target.select(capture.captured, target_classes, image_sizes)
            features = {level: capture.captured["features"][level] for level in self.levels}
            gradients = self._gradients(selected, features) if self.needs_gradients else None
            maps = self.compute_maps(features, gradients, selected.classes)
        return Saliency(
            maps={level: maps[level].detach() for level in maps},
            target_classes=selected.classes,
            confidence=selected.confidence.detach(),
            image_sizes=image_sizes,
            padded_size=capture.padded_size,
            scores=selected.probabilities,
            boxes=selected.boxes,
        )

    def compute_maps(
        self,
        features: Dict[str, torch.Tensor],
        gradients: Optional[Dict[str, torch.Tensor]],
        classes: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: {level: (N, C, h, w)} backbone outputs of the explained levels.
            gradients: {level: d(target score)/d(features)}, or None if not ``needs_gradients``.
            classes: (N,) the explained class of each image; -1 where there is none.

        Returns:
            {level: (N, h, w)} maps, brought to [0, 1] min-max per image by the metrics.
        """
        raise NotImplementedError

    def _gradients(self, selected: TargetScores, features) -> Dict[str, torch.Tensor]:
        # Images are independent in eval mode, so the gradient of the summed target scores with
        # respect to image i's features is that of image i's own score. Images without a target
        # get zero gradients (and maps); their scores are not in the sum.
        explained = selected.explained
        if not bool(explained.any()):
            return {level: torch.zeros_like(value) for level, value in features.items()}
        score = selected.scores[explained].sum()
        gradients = torch.autograd.grad(score, list(features.values()), allow_unused=True)
        unused = [level for level, grad in zip(features, gradients) if grad is None]
        if unused:
            raise ValueError(
                f"{type(self).__name__}: level(s) {unused} do not influence the explained score "
                f"({self.target.level_hint})"
            )
        return dict(zip(features, gradients))
