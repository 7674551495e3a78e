"""Classification (perception) heads: backbone features in, class logits out."""
from typing import Dict

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

CLS_HEAD_REGISTRY = Registry("CLS_HEAD")
CLS_HEAD_REGISTRY.__doc__ = """
Registry for classification (perception) heads. A head takes the backbone's feature dict and
returns (N, K) logits. Built by ``build_cls_head(cfg, input_shape)``.
"""


@CLS_HEAD_REGISTRY.register()
class PooledFusionHead(nn.Module):
    """Global-average-pool every chosen level, concatenate, and classify with one linear layer.

    Pooling every level lets each pyramid level, attended or not, contribute to the decision, so
    every level receives a gradient from the class score: that is what per-level Grad-CAM needs.
    """

    @configurable
    def __init__(self, *, in_features, in_channels, num_classes, dropout=0.0):
        super().__init__()
        self.in_features = list(in_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(sum(in_channels), num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.CLS_HEAD.IN_FEATURES
        unknown = [f for f in in_features if f not in input_shape]
        if unknown:
            raise ValueError(
                f"MODEL.CLS_HEAD.IN_FEATURES: unknown feature(s) {unknown}; "
                f"the backbone produces {sorted(input_shape)}"
            )
        return {
            "in_features": in_features,
            "in_channels": [input_shape[f].channels for f in in_features],
            "num_classes": cfg.MODEL.CLS_HEAD.NUM_CLASSES,
            "dropout": cfg.MODEL.CLS_HEAD.DROPOUT,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [features[f].mean(dim=(2, 3)) for f in self.in_features]
        return self.linear(self.dropout(torch.cat(pooled, dim=1)))


def build_cls_head(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the head named by ``cfg.MODEL.CLS_HEAD.NAME``."""
    return CLS_HEAD_REGISTRY.get(cfg.MODEL.CLS_HEAD.NAME)(cfg, input_shape)
