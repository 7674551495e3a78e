"""The attention branch's map M as an explanation: free, from the forward pass alone."""
from .branch import BranchSaliency

__all__ = ["AttentionSaliency"]


class AttentionSaliency(BranchSaliency):
    """
    The attention map M in [0, 1] of the branch on each level (ABN's explanation). M is a feature
    gate, g' = (1 + M) g: it does not depend on the explained class, and nothing in training asks
    it to keep or to remove the evidence. :class:`~fal_d2.explain.branch_cam.BranchCAM` is the
    branch's class-specific map.
    """

    def compute_maps(self, features, gradients, classes):
        attention = self.model.backbone.last_attention
        return {level: attention[level].attention[:, 0] for level in self.levels}
