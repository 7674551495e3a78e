"""What every folder-of-images classification dataset shares (UC Merced, your own image folders):
the image files read, the per-image dataset dict, the seeded per-class shuffle behind their splits
and the registration with the metadata Detectron2's evaluators and visualizers look up."""
import random

from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "IMAGE_EXTENSIONS",
    "classification_record",
    "register_classification_split",
    "seeded_class_shuffle",
]

IMAGE_EXTENSIONS = (".tif", ".tiff", ".webp", ".png", ".jpg", ".jpeg", ".bmp")


def classification_record(file_name, image_id, label, class_name):
    """
    One image in Detectron2's dataset-dict format: "file_name", "image_id", "height" and "width"
    (read from the image header, without decoding pixels), "label" (index into the dataset's
    ``thing_classes``) and "class_name". A file that is not an image fails here, naming the file,
    before training starts rather than in a data-loader worker.
    """
    try:
        with Image.open(file_name) as image:  # lazy: parses the header only
            width, height = image.size
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError too
        raise ValueError(f"{file_name}: not a readable image ({error})") from None
    return {
        "file_name": file_name,
        "image_id": image_id,
        "height": height,
        "width": width,
        "label": label,
        "class_name": class_name,
    }


def seeded_class_shuffle(items_by_class, seed):
    """
    Yield (class name, items) per class in sorted class order, each class's items sorted and
    then shuffled by one ``random.Random(seed)``: a stratified split taken from these lists is the
    same on every machine, whatever order the file system listed the files in.
    """
    rng = random.Random(seed)
    for class_name in sorted(items_by_class):
        items = sorted(items_by_class[class_name])
        rng.shuffle(items)
        yield class_name, items


def register_classification_split(name, load, class_names, **metadata):
    """
    Register ``load`` (a function returning the dataset dicts) as ``name``, with metadata:
    ``thing_classes`` holds the class names because Detectron2's Visualizer and evaluators look
    class names up under that key; ``evaluator_type="classification"`` lets a trainer pick the
    accuracy evaluator; ``metadata`` adds the rest (where the images came from, which split).
    """
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names), evaluator_type="classification", **metadata
    )
