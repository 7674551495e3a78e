"""Explain one image in one call, with any saliency method, on any fal_d2 classifier.

    explainer = Explainer.from_config_file("configs/fal_p2p3_R18_cpu.yaml", "model_final.pth")
    image = cv2.imread("airplane04.jpg")
    result = explainer(image, methods=["gradcam", "branch_cam"])
    cv2.imwrite("gradcam_p2.png", explainer.draw(image, result.maps["gradcam"]["p2"]))

The image is prepared by FALPredictor (BGR in, resized as the test mapper resizes) and every map
is brought back to the image by normalize_saliency, as the evaluator brings the maps it scores:
a map here is the evaluator's map of the same image, resized to the image's own size.
"""
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from fal_d2.config import load_config, model_class_names
from fal_d2.explain import (
    SALIENCY_METHODS,
    SaliencyMethod,
    applicable_levels,
    build_saliency_method,
    draw_overlay,
)
from fal_d2.explain.metrics import normalize_saliency
from fal_d2.predictor import FALPredictor, to_bgr_uint8
from fal_d2.task import is_classifier

__all__ = ["Explainer", "ImageExplanation"]

# The maps the model's own forward returns: its explanation head's ("explanation"), which ranks
# pixels best where the model has one, else its branches' ("class_map" and "attention"); any
# other model is explained by Grad-CAM unless asked otherwise.
HEAD_METHOD = "head"
BUILT_IN_METHODS = ("branch_cam", "attention")
FALLBACK_METHOD = "gradcam"


@dataclass
class ImageExplanation:
    """What :class:`Explainer` returns for one image."""

    scores: np.ndarray  # (K,) class probabilities
    pred_class: int
    class_name: Optional[str]  # of pred_class; None when the config's test set names no classes
    target_class: int  # the explained class: pred_class unless another one was asked for
    target_name: Optional[str]
    maps: Dict[str, Dict[str, np.ndarray]]  # method -> level -> (H, W) float32 in [0, 1]


class Explainer:
    """
    ``Explainer(cfg)(cv2.imread(path), methods=["gradcam"])``: class scores and saliency maps of
    one image, at its own size, for its predicted class or a chosen one.

    It is not a method of FALPredictor: a predictor is Detectron2's no-gradient forward returning
    the model's own dict, while an explanation needs gradients (Grad-CAM), a choice of methods,
    levels and class, and maps normalised to the image; as pytorch-grad-cam's ``GradCAM(model,
    target_layers)`` sits beside the model, this sits beside a FALPredictor, whose preprocessing
    and weights check it uses. Any classifier works, with or without attention branches; methods
    are looked up in ``fal_d2.explain.SALIENCY_METHODS``.
    """

    def __init__(self, cfg, allow_random_weights: bool = False):
        """
        Args:
            cfg: a FALClassifier config; ``MODEL.WEIGHTS`` must be given and fit the model
                (see fal_d2.checkpoint.load_weights) unless ``allow_random_weights``.
        """
        if not is_classifier(cfg):
            raise ValueError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} is not a "
                             f"classifier; Explainer explains FALClassifier models (for "
                             f"detectors use tools/explain.py)")
        self.predictor = FALPredictor(cfg, allow_random_weights=allow_random_weights)
        self.model = self.predictor.model
        self.num_classes = cfg.MODEL.CLS_HEAD.NUM_CLASSES
        self.class_names = model_class_names(cfg)
        self.levels = list(cfg.TEST.EXPLAIN.LEVELS)  # explained unless levels are given
        has_branches = len(getattr(self.model.backbone, "attention_branches", {})) > 0
        if getattr(self.model, "explanation_head", None):
            self.default_methods = [HEAD_METHOD]
        else:
            self.default_methods = list(BUILT_IN_METHODS) if has_branches else [FALLBACK_METHOD]

    @classmethod
    def from_config_file(cls, config_file: str, weights: Optional[str] = None,
                         opts: Sequence[str] = (), allow_random_weights: bool = False):
        """The Explainer of ``config_file`` with ``KEY VALUE`` overrides ``opts`` and, if given,
        ``weights`` as MODEL.WEIGHTS."""
        cfg = load_config(config_file, opts)
        if weights is not None:
            cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        return cls(cfg, allow_random_weights=allow_random_weights)

    def __call__(self, image, methods: Optional[Sequence[str]] = None,
                 levels: Optional[Sequence[str]] = None,
                 target_class: Union[int, str, None] = None,
                 output_size: Optional[Tuple[int, int]] = None) -> ImageExplanation:
        """
        Args:
            image: (H, W, 3) uint8 BGR as ``cv2.imread`` returns it, or another layout
                ``fal_d2.predictor.to_bgr_uint8`` takes (grayscale, BGRA, uint16, float).
            methods: names in SALIENCY_METHODS; default: ``default_methods``.
            levels: the levels every method explains, each of which must apply to every method;
                default: for each method, the levels of TEST.EXPLAIN.LEVELS where it applies.
            target_class: the class to explain, by index or name; default: the predicted class.
            output_size: (height, width) of the maps; default: the image's.
        """
        built = self._build_methods(methods, levels)
        target = None if target_class is None else [self.class_index(target_class)]
        inputs = self.predictor.preprocess(image, output_size)
        output_size = (inputs["height"], inputs["width"])
        maps, scores, explained = {}, None, None
        for name, method in built.items():
            saliency = method([inputs], target)
            maps[name] = {
                level: normalize_saliency(level_maps, saliency.image_sizes[0],
                                          saliency.padded_size, output_size)[0].cpu().numpy()
                for level, level_maps in saliency.maps.items()
            }
            if scores is None:  # every method runs the same forward pass
                scores = saliency.scores[0].cpu().numpy()
                explained = int(saliency.target_classes[0])
        pred_class = int(scores.argmax())
        return ImageExplanation(scores=scores, pred_class=pred_class,
                                class_name=self.class_name(pred_class), target_class=explained,
                                target_name=self.class_name(explained), maps=maps)

    @staticmethod
    def draw(image, saliency, alpha: float = 0.5) -> np.ndarray:
        """The heatmap of ``saliency`` (an (h, w) map in [0, 1], resized to the image if needed)
        over ``image`` (a layout ``__call__`` takes), as (H, W, 3) uint8 BGR for ``cv2.imwrite``."""
        return draw_overlay(to_bgr_uint8(image), saliency, alpha)

    def class_index(self, target_class: Union[int, str]) -> int:
        """The index of a class given by index or name; a string of digits is an index unless a
        class has that name (so that a command line's "--target-class 3" works)."""
        if isinstance(target_class, str):
            if self.class_names and target_class in self.class_names:
                return self.class_names.index(target_class)
            if not target_class.isdigit():
                known = (f"classes: {self.class_names}" if self.class_names else
                         f"the config's test set does not name the model's classes; give an "
                         f"index in [0, {self.num_classes})")
                raise ValueError(f"unknown class {target_class!r}; {known}")
            target_class = int(target_class)
        if isinstance(target_class, bool) or not isinstance(target_class, numbers.Integral):
            raise ValueError(f"a class is an index or a name, got {target_class!r}")
        if not 0 <= target_class < self.num_classes:
            raise ValueError(f"class index {target_class} is outside [0, {self.num_classes})")
        return int(target_class)

    def class_name(self, index: int) -> Optional[str]:
        return self.class_names[index] if self.class_names else None

    def _build_methods(self, methods, levels) -> Dict[str, SaliencyMethod]:
        """Each method, built before any forward pass so that a bad name or level fails first."""
        if methods is None:
            methods = self.default_methods
        methods = [methods] if isinstance(methods, str) else list(methods)
        unknown = [name for name in methods if name not in SALIENCY_METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown saliency method(s) {unknown or methods}; known: "
                             f"{sorted(SALIENCY_METHODS)}")
        built = {}
        for name in methods:
            if levels is None:
                chosen, _ = applicable_levels(name, self.model, self.levels)
                chosen = chosen or self.levels  # none applies: building on them all says why
            else:
                chosen = [levels] if isinstance(levels, str) else list(levels)
            try:
                built[name] = build_saliency_method(name, self.model, chosen)
            except ValueError as error:
                raise ValueError(f"method {name!r}: {error}") from None
        return built
