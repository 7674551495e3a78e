"""The saliency-method interface: one method per subclass, run on a model without changing it.

A method is built with ``(model, levels)`` for a model that exposes ``backbone`` (returning a dict
``{level: (N, C, H, W)}``) and ``head`` (features -> (N, K) logits) and whose ``forward`` takes a
list of dataset dicts, as :class:`fal_d2.modeling.FALClassifier` does. Calling the method runs the
model's own forward once, with hooks on ``backbone`` and ``head`` that capture the features and the
logits, and returns a :class:`Saliency`.

The explained score is the pre-softmax logit of the target class, as in Grad-CAM: the softmax
couples the classes, so its gradient for one class also carries the other classes' evidence.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Saliency", "SaliencyMethod", "explanation_mode"]


@dataclass
class Saliency:
    """Saliency maps of one batch, with what is needed to bring them back to the images."""

    maps: Dict[str, torch.Tensor]  # level -> (N, h, w), non-negative, covering the padded batch
    scores: torch.Tensor  # (N, K) softmax of the unmodified input
    target_classes: torch.Tensor  # (N,) int64, the explained class of each image
    image_sizes: List[Tuple[int, int]]  # each image's (height, width) as fed to the model
    padded_size: Tuple[int, int]  # (height, width) of the padded batch the maps cover


@contextlib.contextmanager
def explanation_mode(model: nn.Module):
    """
    Put every module in eval mode (BatchNorm uses its running statistics, so images of a batch do
    not interact) and freeze every parameter (no parameter ``.grad`` is ever touched), then restore
    each module's ``training`` flag and each parameter's ``requires_grad``, also on an exception.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in requires_grad:
            param.requires_grad_(False)
        yield model
    finally:
        for module, mode in training:
            module.training = mode
        for param, flag in requires_grad:
            param.requires_grad_(flag)


class _ForwardCapture:
    """
    Hooks that record the backbone's feature dict and the head's logits during one forward, and
    optionally make the backbone's input require grad so that, with frozen parameters, autograd
    still records the graph from the image to the score. Removed on exit, also on an exception.
    """

    def __init__(self, model: nn.Module, input_requires_grad: bool):
        self._model = model
        self._input_requires_grad = input_requires_grad
        self._handles = []
        self.features: Optional[Dict[str, torch.Tensor]] = None
        self.logits: Optional[torch.Tensor] = None
        self.padded_size: Optional[Tuple[int, int]] = None

    def __enter__(self):
        backbone, head = self._model.backbone, self._model.head
        self._handles = [
            backbone.register_forward_pre_hook(self._backbone_input),
            backbone.register_forward_hook(self._backbone_output),
            head.register_forward_hook(self._head_output),
        ]
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _backbone_input(self, module, args):
        images = args[0]
        self.padded_size = tuple(images.shape[-2:])
        if self._input_requires_grad:
            return (images.detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def _backbone_output(self, module, args, output):
        self.features = output

    def _head_output(self, module, args, output):
        self.logits = output


class SaliencyMethod:
    """
    Base class of saliency methods. Subclasses implement :meth:`compute_maps`; set
    ``needs_gradients = False`` when the maps come from the forward pass alone.

    Explaining runs the model in :func:`explanation_mode` and removes its hooks afterwards, so the
    model's mode, parameters' ``requires_grad`` and hook dicts are as they were, whatever happens.
    """

    needs_gradients = True

    def __init__(self, model: nn.Module, levels: Sequence[str]):
        """
        Args:
            model: a classifier exposing ``backbone`` and ``head`` (see the module docstring).
            levels: backbone outputs to explain, e.g. ``["p2", "p3"]``.
        """
        for attribute in ("backbone", "head"):
            if not isinstance(getattr(model, attribute, None), nn.Module):
                raise TypeError(
                    f"{type(self).__name__}: the model ({type(model).__name__}) has no "
                    f"'{attribute}' module; saliency methods need model.backbone and model.head"
                )
        levels = list(levels)
        valid = list(model.backbone.output_shape())
        unknown = [level for level in levels if level not in valid]
        if unknown or not levels:
            raise ValueError(
                f"{type(self).__name__}: unknown level(s) {unknown or levels}; "
                f"the backbone produces {valid}"
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
            target_classes: (N,) classes to explain; None explains each image's predicted class.
        """
        image_sizes = [tuple(inputs["image"].shape[-2:]) for inputs in batched_inputs]
        with explanation_mode(self.model), torch.set_grad_enabled(self.needs_gradients):
            with _ForwardCapture(self.model, self.needs_gradients) as captured:
                self.model(batched_inputs)
            logits = captured.logits
            targets = self._resolve_targets(target_classes, logits)
            features = {level: captured.features[level] for level in self.levels}
            gradients = self._gradients(logits, targets, features) if self.needs_gradients else None
            maps = self.compute_maps(features, gradients)
        return Saliency(
            maps={level: maps[level].detach() for level in maps},
            scores=logits.detach().float().softmax(dim=1),
            target_classes=targets,
            image_sizes=image_sizes,
            padded_size=captured.padded_size,
        )

    def compute_maps(
        self,
        features: Dict[str, torch.Tensor],
        gradients: Optional[Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: {level: (N, C, h, w)} backbone outputs of the explained levels.
            gradients: {level: d(target logit)/d(features)}, or None if not ``needs_gradients``.

        Returns:
            {level: (N, h, w)} non-negative maps.
        """
        raise NotImplementedError

    def _resolve_targets(self, target_classes, logits: torch.Tensor) -> torch.Tensor:
        num_images, num_classes = logits.shape
        if target_classes is None:
            return logits.detach().argmax(dim=1)
        targets = torch.as_tensor(target_classes, dtype=torch.int64, device=logits.device)
        targets = targets.reshape(-1)
        if targets.numel() != num_images:
            raise ValueError(
                f"{type(self).__name__}: {targets.numel()} target classes for {num_images} images"
            )
        if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < num_classes):
            raise ValueError(
                f"{type(self).__name__}: target classes {targets.tolist()} "
                f"outside [0, {num_classes})"
            )
        return targets

    def _gradients(self, logits, targets, features) -> Dict[str, torch.Tensor]:
        # Images are independent in eval mode, so the gradient of the summed target logits with
        # respect to image i's features is that of image i's own logit.
        score = logits.gather(1, targets[:, None]).sum()
        gradients = torch.autograd.grad(score, list(features.values()), allow_unused=True)
        unused = [level for level, grad in zip(features, gradients) if grad is None]
        if unused:
            raise ValueError(
                f"{type(self).__name__}: level(s) {unused} do not influence the class score "
                f"(not used by the head, see MODEL.CLS_HEAD.IN_FEATURES)"
            )
        return dict(zip(features, gradients))
