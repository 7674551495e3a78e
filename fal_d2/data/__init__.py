"""fal_d2 data: UC Merced and your own image folders as datasets, the classification mapper and
loaders, and the synthetic shapes COCO set."""
from . import shapes_coco, ucmerced  # noqa: F401  (register the builtin ucmerced_*, shapes_coco_*)
from .mapper import ClassificationDatasetMapper, RandomRotate90, Rot90Transform
from .resumable_loader import ResumableTrainLoader, build_resumable_train_loader
from .sample_stream import SampleStream, training_seed
from .stacked_batches import build_classification_train_loader, stack_images, unstack_images
from .image_folder import register_from_config, register_image_folder
from .inference_loader import build_batched_test_loader
from .ucmerced import CLASS_NAMES, load_ucmerced, register_ucmerced

__all__ = [
    "CLASS_NAMES",
    "ClassificationDatasetMapper",
    "RandomRotate90",
    "ResumableTrainLoader",
    "Rot90Transform",
    "SampleStream",
    "build_batched_test_loader",
    "build_classification_train_loader",
    "build_resumable_train_loader",
    "load_ucmerced",
    "register_from_config",
    "register_image_folder",
    "register_ucmerced",
    "stack_images",
    "training_seed",
    "unstack_images",
]
