"""FALClassifier: image classification with a (FAL) backbone and a perception head."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from .batch_mixing import BatchMixer
from .cls_head import build_cls_head
from .faithful_map_loss import FaithfulMapLoss
from .map_resize import level_maps_to_images


@META_ARCH_REGISTRY.register()
class FALClassifier(nn.Module):
    """Backbone -> perception head -> class logits, plus ABN losses for every attention branch.

    Training returns ``{"loss_cls", "loss_att_<level>"...}``: L = L_per + sum lambda * L_att, all
    against the same targets (label smoothing, mixup and CutMix by ``batch_mixer``).
    Inference returns one dict per image with ``scores`` (softmax over K), ``pred_class`` (int),
    ``class_map`` ({level: the branch's class-logit map of the predicted class, min-max scaled to
    [0, 1], at the original image size}: the explanation), ``attention`` ({level: the attention
    map M at the original image size}: the feature gate), ``attention_raw`` ({level: M at the
    level's resolution}) and ``attention_scores`` ({level: softmax of that branch's logits}).
    """

    @configurable
    def __init__(self, *, backbone, head, pixel_mean, pixel_std, input_format, att_loss_weight=1.0,
                 channels_last=False, faithful_map_loss: Optional[FaithfulMapLoss] = None,
                 batch_mixer: Optional[BatchMixer] = None):
        """
        Args:
            channels_last (bool): keep weights and images in NHWC memory format. Under AMP on a
                tensor-core GPU, NCHW convolutions pay for layout transposes around every call.
            faithful_map_loss: the optional objective that trains the branches' class maps to
                keep and remove the evidence (MODEL.FAL.FAITHFUL_MAP); adds ``loss_map_*``.
            batch_mixer: turns a training batch's labels into target probabilities, mixing the
                images (mixup, CutMix) and smoothing the labels as configured; None: hard labels.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.faithful_map_loss = faithful_map_loss
        self.batch_mixer = batch_mixer
        self.input_format = input_format
        self.att_loss_weight = att_loss_weight
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # later .to(device) calls keep the format

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "head": build_cls_head(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "att_loss_weight": cfg.MODEL.FAL.ATT_LOSS_WEIGHT,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "faithful_map_loss": FaithfulMapLoss(cfg) if cfg.MODEL.FAL.FAITHFUL_MAP.ENABLED else None,
            "batch_mixer": BatchMixer(cfg),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize, pad and batch the images, as Detectron2's meta-archs do."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        tensor = images.tensor.contiguous(memory_format=self.memory_format)
        return ImageList(tensor, images.image_sizes)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            logits, attention = self.classify(images.tensor)
            return self.postprocess(logits, attention, batched_inputs, images)
        labels = torch.as_tensor([x["label"] for x in batched_inputs], device=self.device)
        pixels, targets = images.tensor, labels
        if self.batch_mixer is not None:
            pixels, targets = self.batch_mixer(pixels, labels)
        logits, attention = self.classify(pixels)
        losses = {"loss_cls": F.cross_entropy(logits, targets)}
        for level, output in attention.items():
            losses[f"loss_att_{level}"] = self.att_loss_weight * F.cross_entropy(
                output.logits, targets
            )
        if self.faithful_map_loss is not None:
            losses.update(self.faithful_map_loss(self, images.tensor, labels, attention))
        return losses

    def classify(self, pixels: torch.Tensor):
        """(N, K) logits and {level: AttentionOutput} for a normalised batch."""
        logits = self.head(self.backbone(pixels))
        return logits, getattr(self.backbone, "last_attention", {})

    @staticmethod
    def postprocess(logits, attention, batched_inputs, images: ImageList) -> List[Dict]:
        scores = logits.float().softmax(dim=1)
        pred = scores.argmax(dim=1)
        pred_classes = pred.tolist()  # one device sync for the batch
        padded_size = tuple(images.tensor.shape[-2:])
        output_sizes = [
            (inputs.get("height", image_size[0]), inputs.get("width", image_size[1]))
            for inputs, image_size in zip(batched_inputs, images.image_sizes)
        ]
        resized = {
            level: level_maps_to_images(out.attention[:, 0], padded_size, images.image_sizes,
                                        output_sizes)
            for level, out in attention.items()
        }
        class_maps = {
            level: level_maps_to_images(out.class_map(pred), padded_size, images.image_sizes,
                                        output_sizes, min_max=True)
            for level, out in attention.items()
        }
        branch_scores = {level: out.logits.float().softmax(dim=1) for level, out in attention.items()}
        return [
            {
                "scores": scores[i],
                "pred_class": pred_classes[i],
                "class_map": {level: maps[i] for level, maps in class_maps.items()},
                "attention": {level: maps[i] for level, maps in resized.items()},
                "attention_raw": {level: out.attention[i, 0] for level, out in attention.items()},
                "attention_scores": {level: level_scores[i]
                                     for level, level_scores in branch_scores.items()},
            }
            for i in range(len(batched_inputs))
        ]
