"""The attention branch's own map M as an explanation: free, from the forward pass alone."""
from typing import Sequence

from torch import nn

from .base import SaliencyMethod

__all__ = ["AttentionSaliency"]


class AttentionSaliency(SaliencyMethod):
    """
    The attention map M in [0, 1] of the branch on each level (ABN's explanation). M does not
    depend on the target (class or detection): the target only enters the reported scores.
    """

    needs_gradients = False

    def __init__(self, model: nn.Module, levels: Sequence[str], target=None):
        super().__init__(model, levels, target)
        attended = list(getattr(model.backbone, "attention_branches", {}))
        missing = [level for level in self.levels if level not in attended]
        if missing:
            raise ValueError(
                f"AttentionSaliency: level(s) {missing} have no attention branch; "
                f"levels with a branch: {attended}"
            )

    def compute_maps(self, features, gradients):
        attention = self.model.backbone.last_attention
        return {level: attention[level].attention[:, 0] for level in self.levels}
