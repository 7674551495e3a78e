"""Backbones with attention branches: FAL on FPN outputs, and ABN on a plain ResNet stage.

Both keep the attention branches' outputs of the last forward in ``backbone.last_attention``, a
dict ``{level: AttentionOutput}`` (logits, attention map, class response). A meta-arch reads it
right after calling the backbone; the backbone itself still returns only the usual feature dict,
so it drops in wherever Detectron2 takes a backbone.
"""
from typing import Callable, Dict, List

from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .attention_branch import AttentionOutput, build_attention_branch


def build_attention_branches(cfg, levels: List[str], shapes: Dict[str, ShapeSpec]) -> nn.ModuleDict:
    """One branch per level, after checking that every level is one the backbone produces."""
    unknown = [level for level in levels if level not in shapes]
    if unknown:
        raise ValueError(
            f"MODEL.FAL.ATTENTION_LEVELS: unknown level(s) {unknown}; "
            f"this backbone produces {sorted(shapes)}"
        )
    if len(set(levels)) != len(levels):
        raise ValueError(f"MODEL.FAL.ATTENTION_LEVELS: repeated level in {list(levels)}")
    return nn.ModuleDict({level: build_attention_branch(cfg, shapes[level]) for level in levels})


class FALFPN(FPN):
    """An FPN whose chosen outputs are reweighted by attention branches: g'(x) = (1 + M(x)) g(x).

    The FPN part is Detectron2's own, with the same parameter names, so an FPN checkpoint loads into
    it and, with no branches, it computes exactly the plain FPN. Top blocks (p6, or p6/p7 for
    RetinaNet) are computed by the FPN from the un-attended features, as in a plain FPN.
    """

    def __init__(
        self,
        *,
        build_branches: Callable[[Dict[str, ShapeSpec]], nn.ModuleDict],
        **fpn_kwargs,
    ):
        """
        Args:
            build_branches: given this FPN's output shapes, returns ``{level: branch}``.
            fpn_kwargs: arguments of Detectron2's :class:`FPN`.
        """
        super().__init__(**fpn_kwargs)
        self.attention_branches = build_branches(self.output_shape())
        self.last_attention: Dict[str, AttentionOutput] = {}

    def forward(self, x):
        features = super().forward(x)
        self.last_attention = {}
        for level, branch in self.attention_branches.items():
            output = branch(features[level])
            features[level] = output.features
            self.last_attention[level] = output
        return features


class ABNResNet(Backbone):
    """The original ABN: a ResNet whose chosen stage output is attended before the later stages.

    ABN (Fukui et al.) attends the res4 output of a ResNet and feeds the result to res5, the
    perception branch. Reuses the same attention branch module as FAL.
    """

    def __init__(self, resnet, attention_branches: nn.ModuleDict):
        super().__init__()
        self.resnet = resnet
        self.attention_branches = attention_branches
        self.last_attention: Dict[str, AttentionOutput] = {}

    def forward(self, x):
        self.last_attention = {}
        outputs = {}
        x = self.resnet.stem(x)
        for name, stage in zip(self.resnet.stage_names, self.resnet.stages):
            x = stage(x)
            if name in self.attention_branches:
                output = self.attention_branches[name](x)
                x = output.features
                self.last_attention[name] = output
            if name in self.resnet.output_shape():
                outputs[name] = x
        return outputs

    def output_shape(self):
        return self.resnet.output_shape()

    @property
    def size_divisibility(self):
        return self.resnet.size_divisibility


def _build_fal_fpn(cfg, input_shape: ShapeSpec, make_top_block) -> FALFPN:
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return FALFPN(
        build_branches=lambda shapes: build_attention_branches(
            cfg, cfg.MODEL.FAL.ATTENTION_LEVELS, shapes
        ),
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=make_top_block(bottom_up),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_fal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN (p2-p6) with attention branches on ``cfg.MODEL.FAL.ATTENTION_LEVELS``."""
    return _build_fal_fpn(cfg, input_shape, lambda bottom_up: LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_fal_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """RetinaNet's ResNet-FPN (p3-p7) with attention branches on the chosen levels."""
    def make_top_block(bottom_up):
        res5_channels = bottom_up.output_shape()["res5"].channels
        return LastLevelP6P7(res5_channels, cfg.MODEL.FPN.OUT_CHANNELS)

    return _build_fal_fpn(cfg, input_shape, make_top_block)


@BACKBONE_REGISTRY.register()
def build_abn_resnet_backbone(cfg, input_shape: ShapeSpec):
    """A plain ResNet with an ABN attention branch after ``cfg.MODEL.FAL.RESNET_ATTENTION_AFTER``."""
    resnet = build_resnet_backbone(cfg, input_shape)
    stage_shapes = {name: ShapeSpec(channels=resnet._out_feature_channels[name],
                                    stride=resnet._out_feature_strides[name])
                    for name in resnet.stage_names}
    branches = build_attention_branches(cfg, [cfg.MODEL.FAL.RESNET_ATTENTION_AFTER], stage_shapes)
    return ABNResNet(resnet, branches)
