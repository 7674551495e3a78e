"""The UC Merced Land Use dataset (Yang & Newsam, 2010) as Detectron2 classification datasets.

Layout, as written by ``datasets/prepare_ucmerced.py``::

    <root>/Images/<class name>/<stem>.<ext>      e.g. Images/airplane/airplane55.tif

Splits are fixed by ``ucmerced_split.json`` (class name -> sorted stems for "train", "val" and
"test"), so results are comparable across runs and machines. Stems are stored without extension so
the split applies to any copy of the images (TIFF original, WebP, PNG, JPEG).
"""
import json
import os

from .classification_catalog import (
    IMAGE_EXTENSIONS,
    classification_record,
    register_classification_split,
    seeded_class_shuffle,
)

__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "SPLIT_FILE",
    "SPLIT_SEED",
    "build_ucmerced_split",
    "load_ucmerced_split",
    "load_ucmerced",
    "register_ucmerced",
]

CLASS_NAMES = [
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
]

SPLIT_FILE = os.path.join(os.path.dirname(__file__), "ucmerced_split.json")
SPLIT_SEED = 42
# Per class: 20 test images, and of the remaining 80 "trainval" images, 10 for validation.
NUM_TEST_PER_CLASS = 20
NUM_VAL_PER_CLASS = 10
# "trainval" is train + val: the set to retrain on once hyper-parameters are chosen on val.
SPLITS = {"train": ("train",), "val": ("val",), "trainval": ("train", "val"), "test": ("test",)}


def build_ucmerced_split(stems_by_class, seed=SPLIT_SEED):
    """
    Build the stratified split deterministically: per class, the stems shuffled by
    :func:`~fal_d2.data.classification_catalog.seeded_class_shuffle` -> the first
    NUM_TEST_PER_CLASS are test, the next NUM_VAL_PER_CLASS val, the rest train.

    Args:
        stems_by_class (dict[str, list[str]]): class name -> image stems, in any order.
        seed (int): the seed recorded in the split file.

    Returns:
        dict: {"seed": seed, "train"/"val"/"test": {class name: sorted stems}}.
    """
    split = {"seed": seed, "train": {}, "val": {}, "test": {}}
    for class_name, stems in seeded_class_shuffle(stems_by_class, seed):
        if len(stems) <= NUM_TEST_PER_CLASS + NUM_VAL_PER_CLASS:
            raise ValueError(f"class {class_name!r} has only {len(stems)} images, too few to split")
        num_heldout = NUM_TEST_PER_CLASS + NUM_VAL_PER_CLASS
        split["test"][class_name] = sorted(stems[:NUM_TEST_PER_CLASS])
        split["val"][class_name] = sorted(stems[NUM_TEST_PER_CLASS:num_heldout])
        split["train"][class_name] = sorted(stems[num_heldout:])
    return split


def load_ucmerced_split(split, split_file=SPLIT_FILE):
    """
    Returns:
        list[tuple[str, str]]: (class name, stem) of the named split in SPLITS, sorted by class
        then stem.
    """
    if split not in SPLITS:
        raise KeyError(f"unknown UC Merced split {split!r}; expected one of {sorted(SPLITS)}")
    with open(split_file) as f:
        stems = json.load(f)
    return sorted(
        (class_name, stem)
        for part in SPLITS[split]
        for class_name, class_stems in stems[part].items()
        for stem in class_stems
    )


def _image_files_by_stem(class_dir):
    """Map stem -> file name in one class folder, so the split works whatever the image format."""
    files = {}
    for name in sorted(os.listdir(class_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in files:
            raise ValueError(
                f"{os.path.join(class_dir, name)}: two images share the stem {stem!r} "
                f"(also {files[stem]})"
            )
        files[stem] = name
    return files


def load_ucmerced(root, split, allow_missing=False):
    """
    Load one split of UC Merced in Detectron2's dataset-dict format.

    Args:
        root (str): the dataset folder, holding ``Images/<class>/<image>``.
        split (str): one of "train", "val", "trainval", "test".
        allow_missing (bool): skip split images absent from ``root`` instead of raising. For
            subsets of the dataset (such as the test suite's mini copy); a full copy should
            always use the default, so that a damaged dataset is not silently trained on.

    Returns:
        list[dict]: one dict per image with "file_name", "image_id" (the stem), "height",
        "width" (read from the image header, without decoding pixels), "label" (index into
        CLASS_NAMES) and "class_name".
    """
    images_dir = os.path.join(root, "Images")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(
            f"{images_dir}: UC Merced images not found; run datasets/prepare_ucmerced.py"
        )
    files_by_class = {}
    dataset_dicts = []
    for class_name, stem in load_ucmerced_split(split):
        class_dir = os.path.join(images_dir, class_name)
        if class_name not in files_by_class:
            files_by_class[class_name] = (
                _image_files_by_stem(class_dir) if os.path.isdir(class_dir) else {}
            )
        file_name = files_by_class[class_name].get(stem)
        if file_name is None:
            if allow_missing:
                continue
            raise FileNotFoundError(
                f"{os.path.join(class_dir, stem)}.*: image of split {split!r} is missing"
            )
        dataset_dicts.append(classification_record(
            os.path.join(class_dir, file_name), stem, CLASS_NAMES.index(class_name), class_name
        ))
    return dataset_dicts


def register_ucmerced(root, prefix="ucmerced", allow_missing=False):
    """
    Register "<prefix>_train", "<prefix>_val", "<prefix>_trainval" and "<prefix>_test". Loading
    is lazy, so registering needs no data on disk.

    Metadata: see :func:`~fal_d2.data.classification_catalog.register_classification_split`;
    ``dataset_root`` and ``split`` say where the images came from.

    Args:
        root (str): the dataset folder, see :func:`load_ucmerced`.
        prefix (str): prefix of the registered names.
        allow_missing (bool): see :func:`load_ucmerced`.

    Returns:
        list[str]: the registered dataset names.
    """
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        register_classification_split(
            name,
            lambda split=split: load_ucmerced(root, split, allow_missing=allow_missing),
            CLASS_NAMES,
            dataset_root=root,
            split=split,
        )
        names.append(name)
    return names


# Builtin datasets, following Detectron2's convention of data under $DETECTRON2_DATASETS.
_BUILTIN_ROOT = os.path.join(
    os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "UCMerced_LandUse"
)
register_ucmerced(_BUILTIN_ROOT)
