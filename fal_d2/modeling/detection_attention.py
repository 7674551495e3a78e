"""What FAL detectors add to a Detectron2 detector: an image-level attention loss and output maps.

A detection image has several classes, so each attention branch is trained as a multi-label
classifier: binary cross-entropy of its (N, K) logits against which of the K detection classes
appear among the image's ground-truth instances. FALRCNN and FALRetinaNet share this module.
"""
import functools
from typing import Dict, List

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import ImageList, Instances

from .attention_branch import AttentionOutput
from .map_resize import level_maps_to_images

__all__ = [
    "FALDetectorMixin",
    "check_detection_attention_config",
    "multi_hot_targets",
    "attention_losses",
    "add_attention_maps",
]


def check_detection_attention_config(cfg, backbone, num_classes_key: str, num_classes: int):
    """
    Fail at build time, naming the keys, when attention branches cannot be trained as asked: the
    backbone must have built a branch on every level of MODEL.FAL.ATTENTION_LEVELS, and the
    branches' K (MODEL.CLS_HEAD.NUM_CLASSES) must be the detector's class count.
    """
    levels = sorted(cfg.MODEL.FAL.ATTENTION_LEVELS)
    branches = sorted(getattr(backbone, "attention_branches", {}))
    if levels and levels != branches:
        raise ValueError(
            f"MODEL.FAL.ATTENTION_LEVELS={levels} but backbone {cfg.MODEL.BACKBONE.NAME} has "
            f"attention branches on {branches}; use a FAL backbone such as "
            f"build_fal_resnet_fpn_backbone"
        )
    if branches and cfg.MODEL.CLS_HEAD.NUM_CLASSES != num_classes:
        raise ValueError(
            f"MODEL.CLS_HEAD.NUM_CLASSES={cfg.MODEL.CLS_HEAD.NUM_CLASSES} must equal "
            f"{num_classes_key}={num_classes}: attention branches classify the detection classes"
        )


def multi_hot_targets(gt_instances: List[Instances], num_classes: int) -> torch.Tensor:
    """(N, K) float targets: 1 where class k has at least one ground-truth instance in image n."""
    targets = torch.zeros(len(gt_instances), num_classes)
    for i, instances in enumerate(gt_instances):
        targets[i, instances.gt_classes.cpu()] = 1.0
    return targets


def attention_losses(
    attention: Dict[str, AttentionOutput], gt_instances: List[Instances], weight: float
) -> Dict[str, torch.Tensor]:
    """``{"loss_att_<level>": weight * BCE(logits, multi-hot targets)}``, averaged over N and K."""
    if not attention:
        return {}
    logits = next(iter(attention.values())).logits
    targets = multi_hot_targets(gt_instances, logits.shape[1]).to(logits.device)
    return {
        f"loss_att_{level}": weight
        * F.binary_cross_entropy_with_logits(output.logits.float(), targets)
        for level, output in attention.items()
    }


def add_attention_maps(
    results: List[Dict],
    attention: Dict[str, AttentionOutput],
    batched_inputs: List[Dict],
    images: ImageList,
) -> List[Dict]:
    """
    Add ``"attention": {level: (H, W) map M in [0, 1]}`` and ``"class_map": {level: (H, W) map}``
    to each image's output, at the image's original size (its "height"/"width" inputs, as
    Detectron2 uses for the instances). The class map is the branch's class-logit map of the top
    detection's class, min-max scaled to [0, 1]; it is ``{}`` for an image without a detection.
    Without attention levels, ``results`` is returned unchanged, as the plain detector's outputs.
    """
    if not attention:
        return results
    padded_size = tuple(images.tensor.shape[-2:])
    output_sizes = [
        (inputs.get("height", image_size[0]), inputs.get("width", image_size[1]))
        for inputs, image_size in zip(batched_inputs, images.image_sizes)
    ]
    def to_images(level_maps, min_max=False):
        return level_maps_to_images(level_maps, padded_size, images.image_sizes, output_sizes,
                                    min_max)

    # Detectron2 sorts each image's instances by score: the first one is the top detection.
    top_classes = torch.tensor(
        [int(r["instances"].pred_classes[0]) if len(r["instances"]) else -1 for r in results]
    )
    resized = {level: to_images(output.attention[:, 0]) for level, output in attention.items()}
    class_maps = {level: to_images(output.class_map(top_classes), min_max=True)
                  for level, output in attention.items()}
    for i, result in enumerate(results):
        result["attention"] = {level: maps[i] for level, maps in resized.items()}
        result["class_map"] = {} if top_classes[i] < 0 else {
            level: maps[i] for level, maps in class_maps.items()
        }
    return results


class FALDetectorMixin:
    """
    The constructor FALRCNN and FALRetinaNet share, put before their Detectron2 parent: it adds
    ``att_loss_weight`` (MODEL.FAL.ATT_LOSS_WEIGHT) and checks the branches against the
    detector's class count, read from the config key ``num_classes_key``.
    """

    num_classes_key = ""  # e.g. "MODEL.ROI_HEADS.NUM_CLASSES"

    @configurable
    def __init__(self, *, att_loss_weight: float = 1.0, **kwargs):
        """
        Args:
            att_loss_weight: weight of each level's attention loss.
            kwargs: arguments of the Detectron2 detector.
        """
        super().__init__(**kwargs)
        self.att_loss_weight = att_loss_weight

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        num_classes = functools.reduce(getattr, cls.num_classes_key.split("."), cfg)
        check_detection_attention_config(cfg, ret["backbone"], cls.num_classes_key, num_classes)
        ret["att_loss_weight"] = cfg.MODEL.FAL.ATT_LOSS_WEIGHT
        return ret
