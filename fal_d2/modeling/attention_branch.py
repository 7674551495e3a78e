"""The ABN attention branch (Fukui et al., CVPR 2019) for one feature level."""
from typing import NamedTuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry

ATTENTION_BRANCH_REGISTRY = Registry("ATTENTION_BRANCH")
ATTENTION_BRANCH_REGISTRY.__doc__ = """
Registry for attention branches: modules that take one level's features (N, C, H, W) and return
an :class:`AttentionOutput`. Built by ``build_attention_branch(cfg, input_shape)``.
"""


class AttentionOutput(NamedTuple):
    """What an attention branch produces for one level."""

    features: torch.Tensor  # attended features g'(x), same shape as the input
    logits: torch.Tensor  # (N, K) attention-branch class logits, trained with L_att
    attention: torch.Tensor  # (N, 1, H, W) attention map M in [0, 1]
    class_response: torch.Tensor  # (N, K, H, W) class-response maps
    # (N, K, H, W) class-logit maps: ``logits`` before global average pooling. Channel c is where
    # the branch sees class c: a CAM (Zhou et al., CVPR 2016) that needs no backward pass.
    class_maps: torch.Tensor

    def class_map(self, classes: torch.Tensor) -> torch.Tensor:
        """(N, H, W): each image's class-logit map of its class in ``classes`` (N,); a class of -1
        (nothing to explain, e.g. a detector without a detection) gives a map of zeros."""
        if not isinstance(classes, torch.Tensor):  # as_tensor on a tensor would warn in a trace
            classes = torch.as_tensor(classes)
        classes = classes.to(device=self.class_maps.device, dtype=torch.int64)
        # gather, not indexing with arange(N): a traced model (fal_d2/export.py) keeps any N.
        index = classes.clamp_min(0)[:, None, None, None].expand(-1, 1, *self.class_maps.shape[-2:])
        maps = self.class_maps.gather(1, index)[:, 0]
        return torch.where((classes >= 0)[:, None, None], maps, torch.zeros_like(maps))


# BRANCH_NORM values that are trainable BatchNorms, and so can also stand after the class response
# and inside M (one normaliser per channel, as ABN has there).
TRAINABLE_BATCH_NORMS = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")


def per_channel_norm(norm: str, channels: int) -> nn.Module:
    """The BatchNorm after the class response (K channels) and inside M (1 channel): of
    ``norm``'s kind where that is a trainable BatchNorm, so that SyncBN reaches it on several
    GPUs; a plain BatchNorm otherwise (GroupNorm's 32 groups divide neither K nor 1, and ABN's
    map needs a normaliser before its sigmoid even when the convs have none)."""
    return get_norm(norm if norm in TRAINABLE_BATCH_NORMS else "BN", channels)


@ATTENTION_BRANCH_REGISTRY.register()
class ABNAttentionBranch(nn.Module):
    """ABN's attention branch, with a channel reduction first so that high-resolution levels stay cheap.

    A 3x3 conv at 256 channels on p2 would cost about half a ResNet-50 trunk, so the level is first
    reduced to ``reduced_channels`` by a 1x1 conv. Then: ``num_convs`` 3x3 convs, the class response
    (1x1 conv to K, BN, ReLU), the attention logits (1x1 conv K->K, global average pooling) and the
    attention map M = sigmoid(BN(1x1 conv K->1)); both BNs follow ``norm``
    (:func:`per_channel_norm`). The output is g'(x) = (1 + M(x)) * g(x): the residual form keeps
    the features intact where M is near 0.
    """

    @configurable
    def __init__(self, *, in_channels, num_classes, reduced_channels=64, num_convs=2, norm="BN"):
        super().__init__()
        convs = []
        channels = in_channels
        for index in range(num_convs + 1):
            kernel = 1 if index == 0 else 3
            convs.append(
                Conv2d(
                    channels,
                    reduced_channels,
                    kernel_size=kernel,
                    padding=kernel // 2,
                    bias=not norm,
                    norm=get_norm(norm, reduced_channels),
                    activation=nn.ReLU(inplace=True),
                )
            )
            channels = reduced_channels
        self.convs = nn.Sequential(*convs)
        self.class_response = nn.Sequential(
            nn.Conv2d(reduced_channels, num_classes, kernel_size=1, bias=False),
            per_channel_norm(norm, num_classes),
            nn.ReLU(inplace=True),
        )
        self.class_logits = nn.Conv2d(num_classes, num_classes, kernel_size=1)
        self.attention_map = nn.Sequential(
            nn.Conv2d(num_classes, 1, kernel_size=1, bias=False),
            per_channel_norm(norm, 1),
            nn.Sigmoid(),
        )

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return {
            "in_channels": input_shape.channels,
            "num_classes": cfg.MODEL.CLS_HEAD.NUM_CLASSES,
            "reduced_channels": cfg.MODEL.FAL.BRANCH_CHANNELS,
            "num_convs": cfg.MODEL.FAL.BRANCH_NUM_CONVS,
            "norm": cfg.MODEL.FAL.BRANCH_NORM,
        }

    def forward(self, features: torch.Tensor) -> AttentionOutput:
        response = self.class_response(self.convs(features))
        class_maps = self.class_logits(response)
        attention = self.attention_map(response)
        return AttentionOutput(
            features=features * (1.0 + attention),
            logits=class_maps.mean(dim=(2, 3)),
            attention=attention,
            class_response=response,
            class_maps=class_maps,
        )


def build_attention_branch(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build the branch named by ``cfg.MODEL.FAL.ATTENTION_BRANCH`` for a level of ``input_shape``."""
    return ATTENTION_BRANCH_REGISTRY.get(cfg.MODEL.FAL.ATTENTION_BRANCH)(cfg, input_shape)
