"""FALRetinaNet: Detectron2's RetinaNet with FAL attention on FPN levels (p3-p7)."""
from typing import Dict, List

from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from .detection_attention import FALDetectorMixin, add_attention_maps, attention_losses


@META_ARCH_REGISTRY.register()
class FALRetinaNet(FALDetectorMixin, RetinaNet):
    """
    A RetinaNet whose backbone (``build_fal_retinanet_resnet_fpn_backbone``) has ABN attention
    branches on MODEL.FAL.ATTENTION_LEVELS; see :class:`FALRCNN` for the losses and outputs it
    adds. With no attention levels it computes exactly what RetinaNet computes.
    """

    num_classes_key = "MODEL.RETINANET.NUM_CLASSES"

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
