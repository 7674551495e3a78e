"""Targets of detectors: each image's top detection, explained through its class logit.

The rule, for one image and a detector with K classes (Faster R-CNN or RetinaNet, FAL or not):

* **Explained detection.** The image's top-scoring detection, of class c. It is found among the
  detector's scored candidates (Faster R-CNN: every proposal and foreground class; RetinaNet: every
  anchor and class) as the highest score above the test threshold
  (``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` / ``MODEL.RETINANET.SCORE_THRESH_TEST``) whose box,
  clipped to the image, is not empty. Non-maximum suppression never removes the highest-scoring
  box and the top-k limits keep it, so this is the first instance the model outputs. With explicit
  target classes, the top-scoring candidate of class c (the model's top class-c detection, unless
  more than ``TEST.DETECTIONS_PER_IMAGE`` higher-scoring detections of other classes push it out).
* **Explained score** (what Grad-CAM differentiates): the detection's pre-activation class logit,
  which is what makes its score and is differentiable with respect to the backbone's features:

  - Faster R-CNN: the box predictor's logit of class c for the detection's proposal, computed from
    the ROI features pooled on that proposal box. The RPN computes proposals without gradients, so
    the box is held fixed; the ROI pooler reads each box from one FPN level (by its size), so the
    gradient, and the Grad-CAM map, is zero on every other level.
  - RetinaNet: the classification logit of class c at the detection's anchor, from the head on
    that anchor's level (zero gradient on the other levels, as above).

  Logits rather than scores, as Grad-CAM does for classifiers: Faster R-CNN's score is a softmax
  over the K classes and background, whose gradient mixes in the other classes; RetinaNet's is a
  sigmoid, whose gradient vanishes for confident detections.
* **Y** = the detection's score as the model reports it (softmax or sigmoid probability).
* **O** (on E = S * I, and on each deletion/insertion step) = the highest score of a class-c
  detection of the model on the modified image whose box overlaps the explained box with
  IoU >= 0.5 (:attr:`DetectionTarget.match_iou`); 0 if there is none.
* **No detection** (no candidate above the threshold): the image has nothing to explain; it gets
  class -1 and is skipped by the metrics, which count it.
"""
from typing import List, NamedTuple, Optional

import torch

from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, pairwise_iou

from .faithfulness import model_outputs
from .targets import Capture, ExplanationTarget, TargetScores, check_target_classes

__all__ = ["DetectionTarget", "FastRCNNBoxTarget", "RetinaNetAnchorTarget"]


class Candidates(NamedTuple):
    """A detector's scored candidates for one image, before thresholding and NMS."""

    logits: torch.Tensor  # (M, K) class logits, in the autograd graph
    probabilities: torch.Tensor  # (M, K) the scores the detector thresholds and reports
    boxes: torch.Tensor  # (M, B, 4) XYXY boxes clipped to the image; B = K or 1 (class-agnostic)


def _clipped(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """(M, B, 4) boxes clipped to the image, as the detectors clip them."""
    clipped = Boxes(boxes.reshape(-1, 4).clone())
    clipped.clip(image_size)
    return clipped.tensor.view_as(boxes)


class DetectionTarget(ExplanationTarget):
    """The top detection of each image (see the module docstring); subclasses give candidates."""

    task = "detection"
    uses_image_labels = False
    chunk_size = 4
    match_iou = 0.5

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def score_threshold(self) -> float:
        raise NotImplementedError

    def candidates(self, captured, image_sizes) -> List[Candidates]:
        """One :class:`Candidates` per image, from what was captured during the forward."""
        raise NotImplementedError

    def select(self, captured, target_classes, image_sizes):
        per_image = self.candidates(captured, image_sizes)
        device = per_image[0].logits.device if per_image else torch.device("cpu")
        if target_classes is not None:
            target_classes = check_target_classes(
                target_classes, len(per_image), self.num_classes, device
            )
        classes, scores, confidence, boxes = [], [], [], []
        for i, candidates in enumerate(per_image):
            probabilities = candidates.probabilities
            keep = (probabilities > self.score_threshold) & Boxes(
                candidates.boxes.reshape(-1, 4)
            ).nonempty().view(candidates.boxes.shape[:2])
            if target_classes is not None:
                keep &= torch.arange(self.num_classes, device=device) == target_classes[i]
            if not bool(keep.any()):
                classes.append(-1)
                scores.append(candidates.logits.new_zeros(()))
                confidence.append(0.0)
                boxes.append(candidates.boxes.new_full((4,), float("nan")))
                continue
            index = int(torch.where(keep, probabilities, -1.0).flatten().argmax())
            row, cls = divmod(index, self.num_classes)
            classes.append(cls)
            scores.append(candidates.logits[row, cls])
            confidence.append(float(probabilities[row, cls]))
            boxes.append(candidates.boxes[row, min(cls, candidates.boxes.shape[1] - 1)])
        return TargetScores(
            classes=torch.tensor(classes, dtype=torch.int64, device=device),
            scores=torch.stack(scores) if scores else torch.zeros(0, device=device),
            confidence=torch.tensor(confidence, dtype=torch.float32, device=device),
            boxes=torch.stack(boxes).float() if boxes else torch.zeros(0, 4, device=device),
        )

    def confidences(self, images, classes, boxes=None):
        if boxes is None:
            raise ValueError("detection targets are re-scored against their explained boxes")
        outputs = model_outputs(self.model, list(images), self.chunk_size)
        result = torch.zeros(len(outputs))
        for t, (output, cls) in enumerate(zip(outputs, classes)):
            instances = output["instances"].to("cpu")
            same_class = instances[instances.pred_classes == int(cls)]
            if len(same_class) == 0:
                continue
            reference = Boxes(boxes[t : t + 1].detach().float().cpu())
            overlap = pairwise_iou(reference, same_class.pred_boxes)[0]
            matched = same_class.scores[overlap >= self.match_iou]
            if len(matched):
                result[t] = matched.max()
        return result


class FastRCNNBoxTarget(DetectionTarget):
    """
    The top detection of a GeneralizedRCNN (Faster/Mask R-CNN, FALRCNN) with a Fast R-CNN box
    predictor: records the ROI heads' proposals and the box predictor's (class logits, box deltas)
    during the forward, and scores every proposal with the predictor's own ``predict_probs`` and
    ``predict_boxes``, as its inference does.
    """

    level_hint = "the box head reads MODEL.ROI_HEADS.IN_FEATURES only"

    def __init__(self, model):
        predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
        if not isinstance(predictor, FastRCNNOutputLayers):
            raise TypeError(
                f"{type(model).__name__}: explaining an R-CNN needs ROI heads with one "
                f"FastRCNNOutputLayers box predictor (e.g. StandardROIHeads); got "
                f"{type(predictor).__name__}"
            )
        super().__init__(model)

    @property
    def _predictor(self) -> FastRCNNOutputLayers:
        return self.model.roi_heads.box_predictor

    @property
    def num_classes(self):
        return self._predictor.num_classes

    @property
    def score_threshold(self):
        return self._predictor.test_score_thresh

    def score_levels(self) -> Optional[List[str]]:
        return list(getattr(self.model.roi_heads, "box_in_features", None)
                    or self.model.roi_heads.in_features)

    def captures(self):
        def proposals(call):
            args, kwargs = call
            return args[2] if len(args) > 2 else kwargs["proposals"]

        return {
            "proposals": Capture(self.model.roi_heads, inputs=True, transform=proposals),
            "predictions": Capture(self._predictor),
        }

    def candidates(self, captured, image_sizes):
        predictions, proposals = captured["predictions"], captured["proposals"]
        probabilities = self._predictor.predict_probs(predictions, proposals)
        boxes = self._predictor.predict_boxes(predictions, proposals)
        logits = predictions[0].split([len(p) for p in proposals])
        k = self.num_classes
        return [
            Candidates(
                logits=image_logits[:, :k],
                probabilities=image_probabilities.detach()[:, :k],
                boxes=_clipped(image_boxes.detach().view(len(proposal), -1, 4),
                               proposal.image_size),
            )
            for image_logits, image_probabilities, image_boxes, proposal in zip(
                logits, probabilities, boxes, proposals
            )
        ]


class RetinaNetAnchorTarget(DetectionTarget):
    """
    The top detection of a RetinaNet (or FALRetinaNet): records the head's per-level
    (class logits, box deltas) during the forward and decodes every anchor's box with the model's
    own anchor generator and box transform, as its inference does.
    """

    level_hint = "the RetinaNet head reads MODEL.RETINANET.IN_FEATURES only"

    @property
    def num_classes(self):
        return self.model.num_classes

    @property
    def score_threshold(self):
        return self.model.test_score_thresh

    def score_levels(self) -> Optional[List[str]]:
        return list(self.model.head_in_features)

    def captures(self):
        # RetinaNet's inference applies sigmoid_ in place to views of the head's logits (a view
        # when a level is 1x1): keep copies, which stay logits and stay in the graph.
        def copied(output):
            logits, deltas = output
            return [level.clone() for level in logits], list(deltas)

        return {"head": Capture(self.model.head, transform=copied)}

    def candidates(self, captured, image_sizes):
        logits, deltas = captured["head"]
        features = [captured["features"][name] for name in self.model.head_in_features]
        anchors = Boxes.cat(self.model.anchor_generator(features)).tensor
        k = self.num_classes
        logits = torch.cat([permute_to_N_HWA_K(level, k) for level in logits], dim=1)
        deltas = torch.cat([permute_to_N_HWA_K(level, 4) for level in deltas], dim=1)
        result = []
        for i, image_size in enumerate(image_sizes):
            boxes = self.model.box2box_transform.apply_deltas(deltas[i].detach(), anchors)
            result.append(
                Candidates(
                    logits=logits[i],
                    probabilities=logits[i].detach().sigmoid(),
                    boxes=_clipped(boxes[:, None], image_size),
                )
            )
        return result
