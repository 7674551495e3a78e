"""A decoupled explanation head: class maps learned from detached features, so that training it
cannot change what the classifier predicts.

Like the masking models of Dabkowski & Gal (NeurIPS 2017, real-time saliency), L-CAM (Gkartzonika
et al., 2022) and TAME (Ntrougkas et al., 2023), a small network reads a trained classifier's
features and outputs one map per class; an objective trains it against the frozen classifier
(:mod:`fal_d2.modeling.explanation_head_loss`). Here there is one head per pyramid level, and its
input is detached: no gradient of its objective reaches the trunk, the FPN, the attention
branches or their maps M, in a joint run or in a second stage.
"""
from typing import Dict, List

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from fvcore.nn.weight_init import c2_msra_fill

__all__ = ["ExplanationHead", "build_explanation_heads", "check_explain_head_config"]


class ExplanationHead(nn.Module):
    """A 1x1 conv that reduces the level to ``channels`` (as the attention branches do: p2 has
    the most positions, so its width sets the head's cost), ``num_convs`` x (3x3 conv) at that
    width, each conv followed by BN and ReLU, then a 1x1 conv to K class logits at the level's
    resolution; the map of class c is sigmoid(logit c), in [0, 1].

    ``num_updates`` (int64, saved in checkpoints) counts the training steps that computed the
    head's objective: 0 means a head that was never trained, whose maps mean nothing.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, num_convs: int = 2):
        super().__init__()
        layers: List[nn.Module] = []
        for index in range(num_convs + 1):
            kernel = 1 if index == 0 else 3
            layers += [nn.Conv2d(in_channels if index == 0 else channels, channels, kernel,
                                 padding=kernel // 2, bias=False),
                       nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.class_logits = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                c2_msra_fill(module)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) features of the level -> (N, K, h, w) class logits. The input is detached
        here, so whatever calls the head, its gradient stops at the head."""
        return self.class_logits(self.convs(features.detach()))

    def class_maps(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(N, h, w) in [0, 1]: each image's map of its class in ``classes`` (N,); a class of -1
        (nothing to explain) gives zeros."""
        logits = self(features)
        classes = classes.to(device=logits.device, dtype=torch.int64)
        # gather, not indexing with arange(N): a traced model (fal_d2/export.py) keeps any N.
        index = classes.clamp_min(0)[:, None, None, None].expand(-1, 1, *logits.shape[-2:])
        maps = torch.sigmoid(logits.gather(1, index)[:, 0].float())
        return torch.where((classes >= 0)[:, None, None], maps, torch.zeros_like(maps))


def check_explain_head_config(cfg) -> None:
    """Fail at build time, with one line naming the key, on values outside their range."""
    node, prefix = cfg.MODEL.EXPLAIN_HEAD, "MODEL.EXPLAIN_HEAD"
    if node.TRAIN_ONLY_HEAD and not node.ENABLED:
        raise ValueError(f"{prefix}.TRAIN_ONLY_HEAD needs {prefix}.ENABLED True (there is no "
                         f"head to train)")
    if not node.ENABLED:
        return
    levels = list(node.LEVELS)
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"{prefix}.LEVELS={levels}: give one or more distinct levels")
    budgets = list(node.BUDGETS)
    if not budgets or any(not 0 < b < 100 for b in budgets):
        raise ValueError(f"{prefix}.BUDGETS={budgets}: give percentages in (0, 100), e.g. [15, 50]")
    for key in ("KEEP_WEIGHT", "DESTROY_WEIGHT", "AREA_WEIGHT", "TV_WEIGHT", "IMS_PER_LEVEL",
                "START_ITER", "NUM_CONVS"):
        if node[key] < 0:
            raise ValueError(f"{prefix}.{key}={node[key]} must be >= 0")
    for key in ("SHARPNESS", "CHANNELS"):
        if node[key] <= 0:
            raise ValueError(f"{prefix}.{key}={node[key]} must be > 0")
    if node.TARGET not in ("pred", "label"):
        raise ValueError(f"{prefix}.TARGET={node.TARGET!r}: expected 'pred' or 'label'")
    if node.TRAIN_ONLY_HEAD and node.START_ITER:
        raise ValueError(f"{prefix}.START_ITER={node.START_ITER}: must be 0 with TRAIN_ONLY_HEAD "
                         f"(the second stage trains nothing but the head)")


def build_explanation_heads(cfg, shapes: Dict[str, ShapeSpec]) -> nn.ModuleDict:
    """One :class:`ExplanationHead` per level of ``MODEL.EXPLAIN_HEAD.LEVELS``, after checking
    that every level is one the backbone produces."""
    node = cfg.MODEL.EXPLAIN_HEAD
    unknown = [level for level in node.LEVELS if level not in shapes]
    if unknown:
        raise ValueError(f"MODEL.EXPLAIN_HEAD.LEVELS: unknown level(s) {unknown}; "
                         f"this backbone produces {sorted(shapes)}")
    return nn.ModuleDict({
        level: ExplanationHead(shapes[level].channels, cfg.MODEL.CLS_HEAD.NUM_CLASSES,
                               channels=node.CHANNELS, num_convs=node.NUM_CONVS)
        for level in node.LEVELS
    })
