"""A training objective that makes the attention branches' class maps faithful at a fixed budget.

L_att trains a branch's class-logit maps only through their spatial mean, so nothing asks the map
to point at the evidence the classifier uses. This objective does, on the measure it is judged by:

* T, the soft top k % of a level's class map S for the label (S min-max scaled to [0, 1] at the
  input size, k drawn per image from ``budgets``): T = S * sigmoid(sharpness * (S - q_k)), q_k
  the (100 - k) % quantile of S. A fixed budget means the objective cannot buy its score with
  coverage, and T is the map that the budgeted Average Drop evaluates;
* keep (Average Drop's own criterion): the cross-entropy of the label on T * x;
* destroy (GAIN's attention mining, Li et al., CVPR 2018): the label's probability on (1 - T) * x;
* area: mean(T), so that the map stays peaked inside its budget.

x is the *normalised* input, so masked pixels are the mean colour, as in the evaluation. The masked
passes use BatchNorm's running statistics, as inference does, and leave them unchanged. By default
they run on detached weights, as TAME trains its maps against a frozen classifier: their gradient
reaches the class maps (through T), not the classifier, which is never taught to recognise masked
images (``update_classifier`` lets it be: on the CPU schedule that cost 15 points of top-1). Cost:
two extra forward/backward passes for ``ims_per_level`` images per branch, from ``start_iter`` on.
"""
import contextlib
import itertools
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from .attention_branch import AttentionOutput
from .map_resize import min_max_per_image

__all__ = ["FaithfulMapLoss", "check_faithful_map_config", "batchnorm_in_eval"]


@contextlib.contextmanager
def batchnorm_in_eval(model: nn.Module):
    """BatchNorm layers normalise with (and keep) their running statistics inside the block."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]
    try:
        for layer in layers:
            layer.eval()
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)


def detached_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's parameters and buffers, detached: run with :func:`functional_call`, the
    module computes as usual but no gradient reaches its weights."""
    return {name: tensor.detach() for name, tensor in
            itertools.chain(module.named_parameters(), module.named_buffers())}


def check_faithful_map_config(cfg) -> None:
    """Fail at build time, with one line naming the key, on values outside their range."""
    node = cfg.MODEL.FAL.FAITHFUL_MAP
    prefix = "MODEL.FAL.FAITHFUL_MAP"
    budgets = list(node.BUDGETS)
    if not budgets or any(not 0 < b < 100 for b in budgets):
        raise ValueError(f"{prefix}.BUDGETS={budgets}: give percentages in (0, 100), e.g. [15, 50]")
    for key in ("KEEP_WEIGHT", "DESTROY_WEIGHT", "AREA_WEIGHT"):
        if node[key] < 0:
            raise ValueError(f"{prefix}.{key}={node[key]} must be >= 0")
    if node.SHARPNESS <= 0:
        raise ValueError(f"{prefix}.SHARPNESS={node.SHARPNESS} must be > 0")
    if node.IMS_PER_LEVEL < 1:
        raise ValueError(f"{prefix}.IMS_PER_LEVEL={node.IMS_PER_LEVEL} must be >= 1")
    if node.START_ITER < 0:
        raise ValueError(f"{prefix}.START_ITER={node.START_ITER} must be >= 0")


class FaithfulMapLoss(nn.Module):
    """The objective of the module docstring; called by FALClassifier while training."""

    @configurable
    def __init__(self, *, keep_weight: float = 1.0, destroy_weight: float = 0.5,
                 area_weight: float = 0.5, budgets: Sequence[float] = (15, 50),
                 sharpness: float = 20.0, ims_per_level: int = 4, start_iter: int = 0,
                 update_classifier: bool = False):
        super().__init__()
        self.update_classifier = update_classifier
        self.keep_weight = keep_weight
        self.destroy_weight = destroy_weight
        self.area_weight = area_weight
        self.register_buffer("budgets", torch.tensor([float(b) for b in budgets]), False)
        self.sharpness = sharpness
        self.ims_per_level = ims_per_level
        self.start_iter = start_iter

    @classmethod
    def from_config(cls, cfg):
        check_faithful_map_config(cfg)
        node = cfg.MODEL.FAL.FAITHFUL_MAP
        return {
            "keep_weight": node.KEEP_WEIGHT,
            "destroy_weight": node.DESTROY_WEIGHT,
            "area_weight": node.AREA_WEIGHT,
            "budgets": list(node.BUDGETS),
            "sharpness": node.SHARPNESS,
            "ims_per_level": node.IMS_PER_LEVEL,
            "start_iter": node.START_ITER,
            "update_classifier": node.UPDATE_CLASSIFIER,
        }

    def active(self) -> bool:
        """From ``start_iter`` on, in a Detectron2 training loop; always outside one."""
        try:
            return get_event_storage().iter >= self.start_iter
        except AssertionError:  # no EventStorage: called outside a trainer
            return True

    def soft_budget_mask(self, saliency: torch.Tensor) -> torch.Tensor:
        """T for (n, H, W) maps in [0, 1], each with a budget drawn from ``budgets``."""
        flat = saliency.flatten(1)
        choice = torch.randint(len(self.budgets), (len(flat),), device=flat.device)
        keep_fraction = self.budgets.to(flat.device)[choice] / 100
        threshold = torch.quantile(flat.detach(), 1 - keep_fraction, dim=1).diagonal()
        weights = torch.sigmoid(self.sharpness * (flat - threshold[:, None]))
        return (flat * weights).view_as(saliency)

    def _classify(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.update_classifier:
            return model.head(model.backbone(images))
        features = functional_call(model.backbone, detached_state(model.backbone), (images,))
        return functional_call(model.head, detached_state(model.head), (features,))

    def forward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                attention: Dict[str, AttentionOutput]) -> Dict[str, torch.Tensor]:
        """
        Args:
            model: the classifier, with ``backbone`` and ``head``.
            images: (N, C, H, W) the normalised batch the classifier was trained on.
            labels: (N,) int64; attention: the branches' outputs on ``images``.
        """
        if not attention or not self.active():
            return {}
        count = min(self.ims_per_level, len(labels))
        masks, inputs, targets = [], [], []
        for index, output in enumerate(attention.values()):
            # each level masks other images of the batch, so every branch sees fresh ones
            rows = (torch.arange(count, device=labels.device) + index * count) % len(labels)
            saliency = F.interpolate(output.class_map(labels[rows])[:, None].float(),
                                     size=images.shape[-2:], mode="bilinear", align_corners=False)
            mask = self.soft_budget_mask(min_max_per_image(saliency[:, 0]))
            masks.append(mask)
            inputs.append(images[rows])
            targets.append(labels[rows])
        mask = torch.cat(masks)[:, None].to(images.dtype)
        x, y = torch.cat(inputs), torch.cat(targets)
        masked = torch.cat([x * mask, x * (1 - mask)]).contiguous(
            memory_format=getattr(model, "memory_format", torch.contiguous_format))
        with batchnorm_in_eval(model):
            logits = self._classify(model, masked).float()
        keep_logits, destroy_logits = logits.split(len(y))
        destroyed = destroy_logits.softmax(dim=1).gather(1, y[:, None])
        return {
            "loss_map_keep": self.keep_weight * F.cross_entropy(keep_logits, y),
            "loss_map_destroy": self.destroy_weight * destroyed.mean(),
            "loss_map_area": self.area_weight * mask.float().mean(),
        }
