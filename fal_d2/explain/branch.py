"""The shared base of the maps that attention branches compute in the forward pass."""
from typing import Sequence

from torch import nn

from .base import SaliencyMethod

__all__ = ["BranchSaliency"]


class BranchSaliency(SaliencyMethod):
    """
    A method that reads the outputs of the attention branches (``backbone.last_attention``) of the
    last forward: no backward pass. Built only for levels that have a branch.
    """

    needs_gradients = False

    def __init__(self, model: nn.Module, levels: Sequence[str], target=None):
        super().__init__(model, levels, target)
        attended = list(getattr(model.backbone, "attention_branches", {}))
        missing = [level for level in self.levels if level not in attended]
        if missing:
            having = (f"levels with a branch: {attended}" if attended else
                      "the model has none (MODEL.FAL.ATTENTION_LEVELS is empty)")
            raise ValueError(
                f"{type(self).__name__}: level(s) {missing} have no attention branch; {having}"
            )
