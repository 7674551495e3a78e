"""The explanation head's maps as a saliency method: free, from the forward pass alone."""
from typing import Sequence

from torch import nn

from .base import SaliencyMethod

__all__ = ["ExplanationHeadSaliency"]


class ExplanationHeadSaliency(SaliencyMethod):
    """
    The map of the explained class from the model's explanation head on each level
    (:class:`fal_d2.modeling.explanation_head.ExplanationHead`, MODEL.EXPLAIN_HEAD): a small
    network on the level's detached features, trained against the frozen classifier so that the
    map's top k % keeps the class and hiding it loses the class. Maps are sigmoids, in [0, 1].
    Built only for levels whose head has been trained.
    """

    needs_gradients = False

    def __init__(self, model: nn.Module, levels: Sequence[str], target=None):
        super().__init__(model, levels, target)
        heads = getattr(model, "explanation_head", None) or {}
        trained = [level for level, head in heads.items() if int(head.num_updates) > 0]
        missing = [level for level in self.levels if level not in heads]
        untrained = [level for level in self.levels if level in heads and level not in trained]
        if not heads:
            having = "the model has none (MODEL.EXPLAIN_HEAD.ENABLED is False)"
        else:
            having = f"levels with a trained head: {trained or 'none'} (with a head: {list(heads)})"
        if missing:
            raise ValueError(f"{type(self).__name__}: level(s) {missing} have no explanation "
                             f"head; {having}")
        if untrained:
            raise ValueError(f"{type(self).__name__}: the explanation head of level(s) "
                             f"{untrained} was never trained; {having}")

    def compute_maps(self, features, gradients, classes):
        return {level: self.model.explanation_head[level].class_maps(features[level], classes)
                for level in self.levels}
