"""FAL model parts, registered in Detectron2's and fal_d2's registries on import."""
from .attention_branch import (
    ATTENTION_BRANCH_REGISTRY,
    ABNAttentionBranch,
    AttentionOutput,
    build_attention_branch,
)
from .classifier import FALClassifier
from .cls_head import CLS_HEAD_REGISTRY, PooledFusionHead, build_cls_head
from .fal_backbone import (
    ABNResNet,
    FALFPN,
    build_abn_resnet_backbone,
    build_fal_resnet_fpn_backbone,
    build_fal_retinanet_resnet_fpn_backbone,
)
from .map_resize import level_maps_to_images
from .detection_attention import add_attention_maps, attention_losses, multi_hot_targets
from .fal_rcnn import FALRCNN
from .fal_retinanet import FALRetinaNet
