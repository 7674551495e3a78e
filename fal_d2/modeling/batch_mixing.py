"""Mixup and CutMix on a training batch, with the soft targets every classification loss takes.

They are done in the model, on the normalised batch, rather than in the data loader: a mix needs
two images of the batch, and the loader's workers each see one image at a time. The targets are
returned as probabilities (N, K), label smoothing included, so that L_per and every branch's L_att
are trained on the same mixed targets (the issue with mixing only the perception loss: the branch
would learn the unmixed label of an image that is 40 % another class).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

__all__ = ["BatchMixer", "check_batch_mixing", "soft_targets"]


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(N, K) target probabilities: one-hot ``labels`` with ``smoothing`` spread over all K."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def check_batch_mixing(cfg) -> None:
    """One-line errors, naming the key, for mixing and smoothing values out of range."""
    for key in ("MIXUP_ALPHA", "CUTMIX_ALPHA"):
        value = cfg.INPUT.CLS[key]
        if not value >= 0:
            raise ValueError(f"INPUT.CLS.{key}={value}: must be >= 0 (0 turns it off)")
    prob = cfg.INPUT.CLS.MIX_PROB
    if not 0 <= prob <= 1:
        raise ValueError(f"INPUT.CLS.MIX_PROB={prob}: must be in [0, 1]")
    smoothing = cfg.MODEL.CLS_HEAD.LABEL_SMOOTHING
    if not 0 <= smoothing < 1:
        raise ValueError(f"MODEL.CLS_HEAD.LABEL_SMOOTHING={smoothing}: must be in [0, 1)")


class BatchMixer(nn.Module):
    """Mix a batch with its reversed self, by mixup (a blend) or CutMix (a pasted box).

    Pairing image i with image N-1-i, as timm does, needs no random permutation, so the draw is
    one lambda per batch: the cost is one blend of the batch tensor, well under 1 % of a step.
    For CutMix, lambda is corrected to the box's true area after clipping to the image.
    """

    @configurable
    def __init__(self, *, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0,
                 label_smoothing=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg):
        check_batch_mixing(cfg)
        return {
            "num_classes": cfg.MODEL.CLS_HEAD.NUM_CLASSES,
            "mixup_alpha": cfg.INPUT.CLS.MIXUP_ALPHA,
            "cutmix_alpha": cfg.INPUT.CLS.CUTMIX_ALPHA,
            "prob": cfg.INPUT.CLS.MIX_PROB,
            "label_smoothing": cfg.MODEL.CLS_HEAD.LABEL_SMOOTHING,
        }

    @property
    def mixes(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _draw_method(self):
        """"mixup", "cutmix" or None for this batch, from the torch RNG (saved in checkpoints)."""
        if not self.mixes or torch.rand(()).item() >= self.prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return "cutmix" if torch.rand(()).item() < 0.5 else "mixup"
        return "mixup" if self.mixup_alpha > 0 else "cutmix"

    @staticmethod
    def _beta(alpha: float) -> float:
        return torch.distributions.Beta(alpha, alpha).sample().item()

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        """
        Args:
            images: (N, C, H, W) normalised batch.
            labels: (N,) class indices.

        Returns:
            (images, targets): the (possibly) mixed batch, and (N, K) target probabilities.
        """
        targets = soft_targets(labels, self.num_classes, self.label_smoothing)
        method = self._draw_method()
        if method is None or len(images) < 2:
            return images, targets
        flipped = images.flip(0)
        if method == "mixup":
            lam = self._beta(self.mixup_alpha)
            images = images * lam + flipped * (1.0 - lam)
        else:
            images, lam = self._cutmix(images, flipped, self._beta(self.cutmix_alpha))
        return images, targets * lam + targets.flip(0) * (1.0 - lam)

    @staticmethod
    def _cutmix(images, flipped, lam):
        """Paste a box of about (1 - lam) of the area from ``flipped``; return the true lam."""
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        box_h, box_w = int(round(height * cut)), int(round(width * cut))
        cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
        y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
        x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        return images, 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
