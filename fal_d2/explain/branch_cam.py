"""The attention branch's own class map: a CAM computed in the forward pass."""
from .branch import BranchSaliency

__all__ = ["BranchCAM"]


class BranchCAM(BranchSaliency):
    """
    Channel c of the branch's class-logit maps, the 1x1 conv whose global average is the branch's
    class-c logit (L_att trains it): CAM (Zhou et al., CVPR 2016) on the branch, for the explained
    class c. Unlike the attention map M it is class-specific, and unlike Grad-CAM it needs no
    backward pass. The logits are shifted by their per-image minimum, so that maps are
    non-negative like every method's; min-max scaling (the metrics, the figures) is unchanged.
    """

    def compute_maps(self, features, gradients, classes):
        attention = self.model.backbone.last_attention
        maps = {}
        for level in self.levels:
            logits = attention[level].class_map(classes)
            maps[level] = logits - logits.flatten(1).min(dim=1).values[:, None, None]
        return maps
