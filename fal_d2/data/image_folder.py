"""Your own images as Detectron2 classification datasets: one folder per class.

Layout::

    <root>/<class name>/<image>      e.g. <root>/cats/0001.jpg

Class names are the sub-folders of ``root``, sorted (label i is the i-th); folders whose name
starts with "." are ignored, and only files with an extension in ``IMAGE_EXTENSIONS`` count. The
train/test split is either

* seeded and stratified: in every class, ``test_fraction`` of the images (rounded, at least one
  and never all) are test images, drawn by ``random.Random(seed)`` from the sorted file names, so
  the split is the same on every machine; or
* read from a split file, JSON with the paths of the images relative to ``root``, "/"-separated::

      {"train": ["cats/0001.jpg", "dogs/0007.jpg", ...], "test": ["cats/0002.jpg", ...]}

  Images that the file does not name are left out. Every class needs an image in both lists.

Registering lists the folders but reads no image, so it is cheap; a bad tree still fails there,
in one line naming the folder or file. Loading a split (at the start of training or evaluation)
reads each image's header, which catches a file that is not an image.
"""
import json
import os
import posixpath

from detectron2.data import DatasetCatalog, MetadataCatalog

from .classification_catalog import (
    IMAGE_EXTENSIONS,
    classification_record,
    register_classification_split,
    seeded_class_shuffle,
)

__all__ = [
    "SPLITS",
    "list_image_folder",
    "load_image_folder",
    "read_split_file",
    "register_from_config",
    "register_image_folder",
    "stratified_split",
]

# "all" is train + test: every image of the split, e.g. to explain or to predict on.
SPLITS = ("train", "test", "all")


def list_image_folder(root):
    """
    Returns:
        dict[str, list[str]]: class name -> the paths of its images relative to ``root``
        ("<class>/<file>"), sorted.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: dataset folder not found")
    class_names = sorted(
        entry.name for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_names:
        raise ValueError(f"{root}: no class folders; expected <root>/<class name>/<image>")
    files_by_class = {}
    for class_name in class_names:
        class_dir = os.path.join(root, class_name)
        files = sorted(
            entry.name for entry in os.scandir(class_dir)
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"{class_dir}: class folder has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        files_by_class[class_name] = [f"{class_name}/{name}" for name in files]
    return files_by_class


def stratified_split(root, files_by_class, test_fraction, seed):
    """
    The seeded split of the module docstring.

    Returns:
        dict[str, list[str]]: "train" and "test" -> relative paths, sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    split = {"train": [], "test": []}
    for class_name, files in seeded_class_shuffle(files_by_class, seed):
        if len(files) < 2:
            raise ValueError(f"{os.path.join(root, class_name)}: {len(files)} image, too few to "
                             "split into train and test")
        num_test = min(max(1, round(len(files) * test_fraction)), len(files) - 1)
        split["test"] += files[:num_test]
        split["train"] += files[num_test:]
    return {part: sorted(paths) for part, paths in split.items()}


def read_split_file(split_file, root, files_by_class):
    """
    Read and check a split file (format in the module docstring) against the images found in
    ``root``.

    Returns:
        dict[str, list[str]]: "train" and "test" -> relative paths, sorted.
    """
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"{split_file}: split file not found")
    with open(split_file) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{split_file}: not valid JSON ({error})") from None
    expected = '{"train": [paths relative to the root], "test": [...]}'
    if not (isinstance(content, dict) and set(content) == {"train", "test"}
            and all(isinstance(paths, list) and all(isinstance(path, str) for path in paths)
                    for paths in content.values())):
        raise ValueError(f"{split_file}: expected {expected}")
    images = {path for paths in files_by_class.values() for path in paths}
    split = {}
    for part in ("train", "test"):
        paths = set()
        for path in content[part]:
            normalized = posixpath.normpath(path)
            if normalized not in images:
                raise FileNotFoundError(f"{split_file}: {part!r} names {path!r}, which is not an "
                                        f"image in {root}/<class name>/")
            paths.add(normalized)
        split[part] = sorted(paths)
    both = sorted(set(split["train"]) & set(split["test"]))
    if both:
        raise ValueError(f"{split_file}: {both[0]!r} is in both 'train' and 'test'")
    for part, paths in split.items():
        present = {path.split("/")[0] for path in paths}
        missing = [name for name in files_by_class if name not in present]
        if missing:
            raise ValueError(f"{os.path.join(root, missing[0])}: class has no image in "
                             f"{split_file}'s {part!r} list")
    return split


def load_image_folder(root, relative_paths, class_names):
    """
    Returns:
        list[dict]: the images in Detectron2's dataset-dict format, see
        :func:`~fal_d2.data.classification_catalog.classification_record`; "image_id" is the
        path relative to ``root``.
    """
    labels = {name: label for label, name in enumerate(class_names)}
    dataset_dicts = []
    for path in relative_paths:
        class_name = path.split("/")[0]
        file_name = os.path.join(root, *path.split("/"))
        dataset_dicts.append(classification_record(file_name, path, labels[class_name], class_name))
    return dataset_dicts


def register_image_folder(name, root, split_file="", test_fraction=0.2, seed=0):
    """
    Register "<name>_train", "<name>_test" and "<name>_all" (train + test) from
    ``<root>/<class>/<image>``, with the same metadata as the UC Merced sets (``thing_classes``,
    ``evaluator_type="classification"``, ``dataset_root``, ``split``) plus how it was split.

    Args:
        name (str): prefix of the registered names.
        root (str): the folder holding one sub-folder of images per class.
        split_file (str): a split file (module docstring); "" for the seeded split.
        test_fraction (float): seeded split: the fraction of each class held out for test.
        seed (int): seeded split: the seed of the shuffle.

    Returns:
        list[str]: the registered dataset names.
    """
    files_by_class = list_image_folder(root)
    if split_file:
        split = read_split_file(split_file, root, files_by_class)
    else:
        split = stratified_split(root, files_by_class, test_fraction, seed)
    split["all"] = sorted(split["train"] + split["test"])
    class_names = list(files_by_class)
    names = []
    for part in SPLITS:
        register_classification_split(
            f"{name}_{part}",
            lambda paths=split[part]: load_image_folder(root, paths, class_names),
            class_names,
            **_split_metadata(root, split_file, test_fraction, seed),
            split=part,
        )
        names.append(f"{name}_{part}")
    return names


def _split_metadata(root, split_file, test_fraction, seed):
    """Where the images came from and how they were split: what a second registration of the
    same name must match."""
    seeded = not split_file
    return {"dataset_root": root, "split_file": split_file,
            "test_fraction": test_fraction if seeded else None, "seed": seed if seeded else None}


def register_from_config(cfg):
    """
    Register ``DATASETS.IMAGE_FOLDER`` when its NAME is set: every tool that builds a config
    calls this, so that "<NAME>_train"... resolve in DATASETS.TRAIN and DATASETS.TEST. Calling it
    again with the same keys does nothing (a predictor built by a tool, several tools in one
    process); with other keys for an already registered NAME it fails.

    Returns:
        list[str]: the dataset names, or [] when NAME is empty.
    """
    folder = cfg.DATASETS.IMAGE_FOLDER
    if not folder.NAME:
        return []
    if not folder.ROOT:
        raise ValueError(f"DATASETS.IMAGE_FOLDER.NAME={folder.NAME!r} needs "
                         "DATASETS.IMAGE_FOLDER.ROOT, the folder holding <class name>/<image>")
    names = [f"{folder.NAME}_{part}" for part in SPLITS]
    if names[0] not in DatasetCatalog.list():
        return register_image_folder(folder.NAME, folder.ROOT, folder.SPLIT_FILE,
                                     folder.TEST_FRACTION, folder.SEED)
    wanted = _split_metadata(folder.ROOT, folder.SPLIT_FILE, folder.TEST_FRACTION, folder.SEED)
    metadata = MetadataCatalog.get(names[0])
    registered = {key: metadata.get(key) for key in wanted}
    if registered != wanted:
        raise ValueError(f"DATASETS.IMAGE_FOLDER.NAME={folder.NAME!r}: '{names[0]}' is already "
                         f"registered, from {registered}, not {wanted}")
    return names
