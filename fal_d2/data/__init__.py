"""UC Merced data for fal_d2: dataset registration and the classification dataset mapper."""
from . import ucmerced  # noqa: F401  (registers the builtin ucmerced_* datasets)
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
