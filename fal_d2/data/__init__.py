"""fal_d2 data: UC Merced registration and mapper, and the synthetic shapes COCO set."""
from . import shapes_coco, ucmerced  # noqa: F401  (register the builtin ucmerced_*, shapes_coco_*)
from .mapper import ClassificationDatasetMapper, RandomRotate90, Rot90Transform
from .ucmerced import CLASS_NAMES, load_ucmerced, register_ucmerced

__all__ = [
    "CLASS_NAMES",
    "ClassificationDatasetMapper",
    "RandomRotate90",
    "Rot90Transform",
    "load_ucmerced",
    "register_ucmerced",
]
