"""A synthetic COCO-format detection set of simple shapes, small enough to train on a CPU.

Real detection sets are too big for a smoke run; this one needs no download and exercises the same
path as COCO (``register_coco_instances``, DatasetMapper, COCOEvaluator). Each image is a noisy
background with one to four non-overlapping shapes (circle, square, triangle) of random colour,
size and position. Layout of a generated set::

    <output_dir>/instances.json      COCO "instances" file: images, annotations, categories
    <output_dir>/images/<id>.png

Importing this module registers ``shapes_coco_train`` and ``shapes_coco_val`` under
``$DETECTRON2_DATASETS/shapes_coco/{train,val}`` (default ``./datasets``), as Detectron2 does for
its builtin datasets. Generate them with ``datasets/make_shapes_coco.py``.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data.datasets import register_coco_instances

__all__ = ["SHAPE_CLASSES", "make_shapes_coco", "register_shapes_coco"]

SHAPE_CLASSES = ["circle", "square", "triangle"]  # category ids 1, 2, 3
JSON_NAME = "instances.json"
IMAGE_DIR_NAME = "images"
MAX_SHAPES_PER_IMAGE = 4
PLACEMENT_TRIES = 50
NOISE_STD = 12.0  # grey levels; keeps the task visual rather than a colour lookup


def _shape_area(category, side):
    """Area of the drawn shape (not of its box), as COCO's ``area`` is the object's area."""
    if category == "circle":
        return math.pi * side * side / 4.0
    if category == "square":
        return float(side * side)
    return side * side / 2.0  # triangle: apex at the top middle, base along the bottom edge


def _draw_shape(draw, category, x0, y0, side, colour):
    x1, y1 = x0 + side - 1, y0 + side - 1
    if category == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif category == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    else:
        draw.polygon([(x0 + (side - 1) / 2.0, y0), (x0, y1), (x1, y1)], fill=colour)


def _overlaps(box, boxes, margin=2):
    """Whether square ``box`` (x0, y0, side) comes within ``margin`` pixels of one of ``boxes``."""
    x0, y0, side = box
    return any(
        x0 < bx + bs + margin
        and bx < x0 + side + margin
        and y0 < by + bs + margin
        and by < y0 + side + margin
        for bx, by, bs in boxes
    )


def _contrasting_colour(rng, background):
    """A colour far enough from the background's that every shape is visible."""
    while True:
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background).sum() > 150:
            return tuple(int(c) for c in colour)


def _make_image(rng, size):
    """One image and its shapes as (category, x0, y0, side)."""
    background = rng.integers(0, 256, size=3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    min_side, max_side = max(8, size // 8), max(9, size * 2 // 5)
    shapes, boxes = [], []
    for _ in range(int(rng.integers(1, MAX_SHAPES_PER_IMAGE + 1))):
        for _ in range(PLACEMENT_TRIES):
            side = int(rng.integers(min_side, max_side + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (x0, y0, side)
            if not _overlaps(box, boxes):
                break
        else:
            continue  # no free spot left: this image gets fewer shapes
        category = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        _draw_shape(draw, category, *box, _contrasting_colour(rng, background))
        shapes.append((category, *box))
        boxes.append(box)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)), shapes


def make_shapes_coco(output_dir, num_images, size=128, seed=0):
    """
    Write a shapes set to ``output_dir``, replacing any previous one. The set is built in a
    temporary folder next to ``output_dir`` and renamed into place, so an interrupted run never
    leaves a half-written set behind. The same (num_images, size, seed) gives the same set.

    Args:
        output_dir (str): folder to create.
        num_images (int): number of images.
        size (int): side of the square images, in pixels.
        seed (int): seed of the random generator.

    Returns:
        tuple[str, str]: the instances JSON path and the image folder, inside ``output_dir``.
    """
    if num_images < 1 or size < 32:
        raise ValueError(f"need num_images >= 1 and size >= 32, got {num_images} and {size}")
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=parent)
    try:
        _write_set(tmp_dir, num_images, size, seed)
        if os.path.exists(output_dir):
            old_dir = tmp_dir + ".old"
            os.rename(output_dir, old_dir)
            os.rename(tmp_dir, output_dir)
            shutil.rmtree(old_dir)
        else:
            os.rename(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return os.path.join(output_dir, JSON_NAME), os.path.join(output_dir, IMAGE_DIR_NAME)


def _write_set(output_dir, num_images, size, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(output_dir, IMAGE_DIR_NAME))
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, shapes = _make_image(rng, size)
        file_name = f"{image_id:06d}.png"
        image.save(os.path.join(output_dir, IMAGE_DIR_NAME, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category, x0, y0, side in shapes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": SHAPE_CLASSES.index(category) + 1,
                    "bbox": [x0, y0, side, side],
                    "area": _shape_area(category, side),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"fal_d2 synthetic shapes (seed={seed}, size={size})"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPE_CLASSES)
        ],
    }
    with open(os.path.join(output_dir, JSON_NAME), "w") as f:
        json.dump(coco, f)


def register_shapes_coco(name, output_dir):
    """
    Register a set written by :func:`make_shapes_coco` as a COCO instances dataset named ``name``
    (``evaluator_type="coco"``). Loading is lazy, so the set need not exist yet. ``thing_classes``
    is set now so that class counts can be checked before any data is read.
    """
    register_coco_instances(
        name,
        {"thing_classes": list(SHAPE_CLASSES)},
        os.path.join(output_dir, JSON_NAME),
        os.path.join(output_dir, IMAGE_DIR_NAME),
    )


def _register_builtin_shapes_coco(root):
    for split in ("train", "val"):
        register_shapes_coco(f"shapes_coco_{split}", os.path.join(root, "shapes_coco", split))


_register_builtin_shapes_coco(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
