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
from .explanation_head import build_explanation_heads, check_explain_head_config
from .explanation_head_loss import ExplanationHeadLoss
from .map_resize import level_maps_to_images


@META_ARCH_REGISTRY.register()
class FALClassifier(nn.Module):
    """Backbone -> perception head -> class logits, plus ABN losses for every attention branch.

    Training returns ``{"loss_cls", "loss_att_<level>"...}``: L = L_per + sum lambda * L_att, all
    against the same targets (label smoothing, mixup and CutMix by ``batch_mixer``), and, with an
    explanation head, its ``loss_head_*`` (alone in the second stage, ``train_only_head``).
    Inference returns one dict per image with ``scores`` (softmax over K), ``pred_class`` (int),
    ``class_map`` ({level: the branch's class-logit map of the predicted class, min-max scaled to
    [0, 1], at the original image size}: the explanation), ``attention`` ({level: the attention
    map M at the original image size}: the feature gate), ``attention_raw`` ({level: M at the
    level's resolution}), ``attention_scores`` ({level: softmax of that branch's logits}) and,
    with an explanation head, ``explanation`` ({level: the head's map of the predicted class, in
    [0, 1], at the original image size}).
    """

    @configurable
    def __init__(self, *, backbone, head, pixel_mean, pixel_std, input_format, att_loss_weight=1.0,
                 channels_last=False, explanation_head: Optional[nn.ModuleDict] = None,
                 explanation_head_loss: Optional[ExplanationHeadLoss] = None,
                 train_only_head=False, batch_mixer: Optional[BatchMixer] = None):
        """
        Args:
            channels_last (bool): keep weights and images in NHWC memory format. Under AMP on a
                tensor-core GPU, NCHW convolutions pay for layout transposes around every call.
            explanation_head: {level: ExplanationHead} (MODEL.EXPLAIN_HEAD), or None. Its input
                is detached, so it cannot change the logits.
            explanation_head_loss: its objective; adds ``loss_head_*`` to the training losses.
            train_only_head: the second stage: every parameter outside the explanation head is
                frozen and every module outside it stays in eval mode, also under ``train()``;
                training returns only the head's losses.
            batch_mixer: turns a training batch's labels into target probabilities, mixing the
                images (mixup, CutMix) and smoothing the labels as configured; None: hard labels.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.explanation_head = explanation_head
        self.explanation_head_loss = explanation_head_loss
        self.train_only_head = train_only_head
        if train_only_head:
            if explanation_head is None or explanation_head_loss is None:
                raise ValueError("train_only_head needs an explanation head and its loss")
            for name, param in self.named_parameters():
                if not name.startswith("explanation_head."):
                    param.requires_grad_(False)
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
        check_explain_head_config(cfg)
        enabled = cfg.MODEL.EXPLAIN_HEAD.ENABLED
        # The head's initialisation draws from a fork of the global RNG: whatever draws next
        # (data order, augmentation, mixing) draws what it would without the head.
        with torch.random.fork_rng(devices=[]):
            explanation_head = (build_explanation_heads(cfg, backbone.output_shape())
                                if enabled else None)
        return {
            "backbone": backbone,
            "head": build_cls_head(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "att_loss_weight": cfg.MODEL.FAL.ATT_LOSS_WEIGHT,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "explanation_head": explanation_head,
            "explanation_head_loss": ExplanationHeadLoss(cfg) if enabled else None,
            "train_only_head": cfg.MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD,
            "batch_mixer": BatchMixer(cfg),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        """``nn.Module.train``; in the second stage, everything but the explanation head stays in
        eval mode (BatchNorm statistics frozen, no dropout)."""
        super().train(mode)
        if self.train_only_head:
            for name, module in self.named_children():
                if name != "explanation_head":
                    module.eval()
        return self

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
            logits, attention, features = self.classify(images.tensor)
            return self.postprocess(logits, attention, features, batched_inputs, images)
        labels = torch.as_tensor([x["label"] for x in batched_inputs], device=self.device)
        if self.train_only_head:
            return self.explanation_head_loss(self, images.tensor, labels)
        pixels, targets = images.tensor, labels
        if self.batch_mixer is not None:
            pixels, targets = self.batch_mixer(pixels, labels)
        logits, attention, _ = self.classify(pixels)
        losses = {"loss_cls": F.cross_entropy(logits, targets)}
        for level, output in attention.items():
            losses[f"loss_att_{level}"] = self.att_loss_weight * F.cross_entropy(
                output.logits, targets
            )
        if self.explanation_head_loss is not None:
            losses.update(self.explanation_head_loss(self, images.tensor, labels))
        return losses

    def classify(self, pixels: torch.Tensor):
        """(N, K) logits, {level: AttentionOutput} and the backbone's features for a normalised
        batch."""
        features = self.backbone(pixels)
        logits = self.head(features)
        return logits, getattr(self.backbone, "last_attention", {}), features

    def explanation_maps(self, features: Dict[str, torch.Tensor], classes: torch.Tensor
                         ) -> Dict[str, torch.Tensor]:
        """{level: (N, h, w)} the explanation head's maps of ``classes``, in [0, 1], at the
        level's resolution; {} without a head."""
        heads = self.explanation_head or {}
        return {level: head.class_maps(features[level], classes) for level, head in heads.items()}

    def postprocess(self, logits, attention, features, batched_inputs, images: ImageList
                    ) -> List[Dict]:
        scores = logits.float().softmax(dim=1)
        pred = scores.argmax(dim=1)
        pred_classes = pred.tolist()  # one device sync for the batch
        padded_size = tuple(images.tensor.shape[-2:])
        output_sizes = [
            (inputs.get("height", image_size[0]), inputs.get("width", image_size[1]))
            for inputs, image_size in zip(batched_inputs, images.image_sizes)
        ]

        def to_images(level_maps, min_max=False):
            return level_maps_to_images(level_maps, padded_size, images.image_sizes, output_sizes,
                                        min_max=min_max)

        resized = {level: to_images(out.attention[:, 0]) for level, out in attention.items()}
        class_maps = {level: to_images(out.class_map(pred), min_max=True)
                      for level, out in attention.items()}
        explanations = {level: to_images(maps)
                        for level, maps in self.explanation_maps(features, pred).items()}
        branch_scores = {level: out.logits.float().softmax(dim=1) for level, out in attention.items()}
        outputs = []
        for i in range(len(batched_inputs)):
            output = {
                "scores": scores[i],
                "pred_class": pred_classes[i],
                "class_map": {level: maps[i] for level, maps in class_maps.items()},
                "attention": {level: maps[i] for level, maps in resized.items()},
                "attention_raw": {level: out.attention[i, 0] for level, out in attention.items()},
                "attention_scores": {level: level_scores[i]
                                     for level, level_scores in branch_scores.items()},
            }
            if self.explanation_head is not None:
                output["explanation"] = {level: maps[i] for level, maps in explanations.items()}
            outputs.append(output)
        return outputs
