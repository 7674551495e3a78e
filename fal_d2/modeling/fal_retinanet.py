"""FALRetinaNet: Detectron2's RetinaNet with FAL attention on FPN levels (p3-p7)."""
from typing import Dict, List

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from .detection_attention import (
    add_attention_maps,
    attention_losses,
    check_detection_attention_config,
)


@META_ARCH_REGISTRY.register()
class FALRetinaNet(RetinaNet):
    """
    A RetinaNet whose backbone (``build_fal_retinanet_resnet_fpn_backbone``) has ABN attention
    branches on MODEL.FAL.ATTENTION_LEVELS; see :class:`FALRCNN` for the losses and outputs it
    adds. With no attention levels it computes exactly what RetinaNet computes.
    """

    @configurable
    def __init__(self, *, att_loss_weight: float = 1.0, **kwargs):
        """
        Args:
            att_loss_weight: weight of each level's attention loss.
            kwargs: arguments of :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self.att_loss_weight = att_loss_weight

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        check_detection_attention_config(
            cfg, ret["backbone"], "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
        )
        ret["att_loss_weight"] = cfg.MODEL.FAL.ATT_LOSS_WEIGHT
        return ret

    def forward(self, batched_inputs: List[Dict]):
        outputs = super().forward(batched_inputs)
        attention = getattr(self.backbone, "last_attention", {})
        if self.training:
            gt_instances = [x["instances"] for x in batched_inputs]
            outputs.update(attention_losses(attention, gt_instances, self.att_loss_weight))
            return outputs
        if not attention:
            return outputs
        # Batched again only for its padded and per-image sizes, which the parent does not return.
        images = self.preprocess_image(batched_inputs)
        return add_attention_maps(outputs, attention, batched_inputs, images)
