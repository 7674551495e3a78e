"""FALRCNN: Detectron2's GeneralizedRCNN (Faster/Mask R-CNN) with FAL attention on FPN levels."""
from typing import Dict, List

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .detection_attention import FALDetectorMixin, add_attention_maps, attention_losses


@META_ARCH_REGISTRY.register()
class FALRCNN(FALDetectorMixin, GeneralizedRCNN):
    """
    A GeneralizedRCNN whose backbone (e.g. ``build_fal_resnet_fpn_backbone``) has ABN attention
    branches on MODEL.FAL.ATTENTION_LEVELS. The detector is unchanged: it sees the attended
    features g'(x) = (1 + M(x)) g(x). Each branch is trained on which classes the image contains.

    Training adds ``loss_att_<level>`` (MODEL.FAL.ATT_LOSS_WEIGHT times a multi-label BCE) to the
    detector's losses. Inference adds ``"attention"`` and ``"class_map"`` ({level: map at the
    original image size}, see :func:`add_attention_maps`) to each image's ``{"instances": ...}``;
    the raw branch outputs stay in ``backbone.last_attention``.
    With no attention levels it computes exactly what GeneralizedRCNN computes.
    """

    num_classes_key = "MODEL.ROI_HEADS.NUM_CLASSES"

    def forward(self, batched_inputs: List[Dict]):
        outputs = super().forward(batched_inputs)  # in inference, this calls self.inference
        if self.training:
            attention = getattr(self.backbone, "last_attention", {})
            gt_instances = [x["instances"] for x in batched_inputs]
            outputs.update(attention_losses(attention, gt_instances, self.att_loss_weight))
        return outputs

    def inference(self, batched_inputs: List[Dict], detected_instances=None, do_postprocess=True):
        results = super().inference(batched_inputs, detected_instances, do_postprocess)
        attention = getattr(self.backbone, "last_attention", {})
        if not do_postprocess or not attention:
            return results
        # Batched again only for its padded and per-image sizes, which the parent does not return.
        images = self.preprocess_image(batched_inputs)
        return add_attention_maps(results, attention, batched_inputs, images)
