"""The explanation head's objective: its map, cut to a budget, must keep the frozen classifier's
decision when it alone is shown and lose it when it is hidden.

For an image x (normalised, so a masked pixel is the mean colour, as in the evaluation's
"normalized" convention), the target class c (the frozen classifier's prediction on x, or the
label) and the head's map S of class c upsampled to the input size:

* T = sigmoid(sharpness * (S - q_k)), q_k the detached (100 - k) % quantile of S, k drawn per
  image from ``budgets``: about the binary top k % mask that the budgeted Average Drop keeps. A
  fixed budget means the objective cannot buy its score with coverage;
* keep: CE(f(T * x), c), Average Drop's criterion (Dabkowski & Gal's preservation term);
* destroy: p_c(f((1 - T) * x)), GAIN's attention mining, Dabkowski & Gal's destruction term;
* area: mean(S), and tv: the total variation of S, so that the map stays sparse and smooth
  (Dabkowski & Gal's and TAME's regularisers).

f is the classifier run on a detached copy of its weights (``functional_call``) in eval mode:
BatchNorm uses its running statistics and leaves them unchanged, dropout is off. Together with
the head's detached input, the gradient reaches the head alone, through T. The budget and image
draws come from a generator seeded per step from (seed, rank, level, the head's ``num_updates``),
never from the global RNG: the rest of training draws what it would without the head, and a
resumed run draws what an uninterrupted one would.
"""
import contextlib
import itertools
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from fal_d2.data.seeded_rng import derived_seed

__all__ = ["ExplanationHeadLoss", "eval_mode", "detached_state", "soft_top_k", "total_variation"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """The modules and their submodules in eval mode inside the block, each flag restored after."""
    modes = [(module, module.training) for root in modules for module in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def detached_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's parameters and buffers, detached: run with :func:`functional_call`, the
    module computes as usual but no gradient reaches its weights."""
    return {name: tensor.detach() for name, tensor in
            itertools.chain(module.named_parameters(), module.named_buffers())}


def soft_top_k(maps: torch.Tensor, keep_percent: torch.Tensor, sharpness: float) -> torch.Tensor:
    """(n, H, W) maps and (n,) percentages k -> T = sigmoid(sharpness * (S - q_k)), q_k the
    detached (100 - k) % quantile (nearest rank) of each map: about its top k % at 1."""
    flat = maps.flatten(1)
    ranks = ((1 - keep_percent / 100) * (flat.shape[1] - 1)).round().long()
    threshold = flat.detach().sort(dim=1).values.gather(1, ranks[:, None].to(flat.device))
    return torch.sigmoid(sharpness * (flat - threshold)).view_as(maps)


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of (n, h, w) maps, per pixel: 0 for a constant map."""
    rows = (maps[:, 1:] - maps[:, :-1]).abs().sum()
    columns = (maps[:, :, 1:] - maps[:, :, :-1]).abs().sum()
    return (rows + columns) / maps.numel()


class ExplanationHeadLoss:
    """The objective of the module docstring, for the explanation heads of a
    :class:`~fal_d2.modeling.FALClassifier` (``model.explanation_head``, {level: head})."""

    @configurable
    def __init__(self, *, keep_weight: float = 1.0, destroy_weight: float = 1.0,
                 area_weight: float = 0.2, tv_weight: float = 0.2,
                 budgets: Sequence[float] = (15, 50), sharpness: float = 20.0,
                 ims_per_level: int = 0, start_iter: int = 0, target: str = "pred", seed: int = 0):
        """
        Args:
            ims_per_level: images of each batch masked per level (each level draws its own);
                0: all of them.
            start_iter: the first iteration of a Detectron2 training loop that computes it.
            target: "pred" (the frozen classifier's predicted class) or "label".
            seed: the run's seed, mixed into each step's draws.
        """
        self.keep_weight = keep_weight
        self.destroy_weight = destroy_weight
        self.area_weight = area_weight
        self.tv_weight = tv_weight
        self.budgets = torch.tensor([float(b) for b in budgets])
        self.sharpness = sharpness
        self.ims_per_level = ims_per_level
        self.start_iter = start_iter
        self.target = target
        self.seed = seed

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.EXPLAIN_HEAD
        return {
            "keep_weight": node.KEEP_WEIGHT,
            "destroy_weight": node.DESTROY_WEIGHT,
            "area_weight": node.AREA_WEIGHT,
            "tv_weight": node.TV_WEIGHT,
            "budgets": list(node.BUDGETS),
            "sharpness": node.SHARPNESS,
            "ims_per_level": node.IMS_PER_LEVEL,
            "start_iter": node.START_ITER,
            "target": node.TARGET,
            # torch.initial_seed() draws nothing: the global RNG stays as it would be
            "seed": cfg.SEED if cfg.SEED >= 0 else torch.initial_seed(),
        }

    def active(self) -> bool:
        """From ``start_iter`` on, in a Detectron2 training loop; always outside one."""
        try:
            return get_event_storage().iter >= self.start_iter
        except AssertionError:  # no EventStorage: called outside a trainer
            return True

    def _draw(self, level_index: int, head: nn.Module, batch_size: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows of the batch to mask, their budgets in %), on the CPU, for this step and level."""
        generator = torch.Generator().manual_seed(
            derived_seed(self.seed, comm.get_rank(), level_index, int(head.num_updates)))
        count = batch_size if self.ims_per_level == 0 else min(self.ims_per_level, batch_size)
        if count == batch_size:
            rows = torch.arange(batch_size)
        else:
            rows = torch.randperm(batch_size, generator=generator)[:count]
        choice = torch.randint(len(self.budgets), (count,), generator=generator)
        return rows, self.budgets[choice]

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                 ) -> Dict[str, torch.Tensor]:
        """
        Args:
            model: the classifier: ``backbone``, ``head``, ``explanation_head``, ``memory_format``.
            images: (N, C, H, W) the normalised, unmixed batch.
            labels: (N,) int64 class labels.

        Returns:
            ``loss_head_keep/destroy/area/tv``, weighted; {} before ``start_iter``. Each head's
            ``num_updates`` goes up by one.
        """
        if not self.active():
            return {}
        heads = model.explanation_head
        draws = [self._draw(index, head, len(images)) for index, head in enumerate(heads.values())]
        # One frozen pass over every image some level masks gives the heads' inputs and c.
        needed, where = torch.unique(torch.cat([rows for rows, _ in draws]), return_inverse=True)
        needed, where = needed.to(images.device), where.to(images.device)
        with torch.no_grad(), eval_mode(model.backbone, model.head):
            features = model.backbone(images[needed])
            predicted = model.head(features).argmax(dim=1)
        targets = predicted if self.target == "pred" else labels[needed]

        masks, inputs, classes, areas, variations = [], [], [], [], []
        start = 0
        for (level, head), (rows, keep_percent) in zip(heads.items(), draws):
            index = where[start : start + len(rows)]
            start += len(rows)
            maps = head.class_maps(features[level][index], targets[index])
            saliency = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear",
                                     align_corners=False)[:, 0]
            masks.append(soft_top_k(saliency, keep_percent, self.sharpness))
            inputs.append(images[needed[index]])
            classes.append(targets[index])
            areas.append(maps.mean())
            variations.append(total_variation(maps))
            head.num_updates += 1

        mask = torch.cat(masks)[:, None].to(images.dtype)
        x, y = torch.cat(inputs), torch.cat(classes)
        masked = torch.cat([x * mask, x * (1 - mask)]).contiguous(memory_format=model.memory_format)
        with eval_mode(model.backbone, model.head):
            features = functional_call(model.backbone, detached_state(model.backbone), (masked,))
            logits = functional_call(model.head, detached_state(model.head), (features,)).float()
        keep_logits, destroy_logits = logits.split(len(y))
        destroyed = destroy_logits.softmax(dim=1).gather(1, y[:, None])
        return {
            "loss_head_keep": self.keep_weight * F.cross_entropy(keep_logits, y),
            "loss_head_destroy": self.destroy_weight * destroyed.mean(),
            "loss_head_area": self.area_weight * torch.stack(areas).mean(),
            "loss_head_tv": self.tv_weight * torch.stack(variations).mean(),
        }
