"""Explanation grids in TensorBoard: an evaluation during training hands the grid figures that
:class:`~fal_d2.evaluation.ExplanationEvaluator` wrote to the training's ``EventStorage``, whose
TensorboardXWriter writes them beside the losses, at the iteration they were made."""
import os

import numpy as np
from PIL import Image

from detectron2.utils import events

__all__ = ["put_explanation_grids"]


def put_explanation_grids(explain_dir, dataset_name, methods):
    """
    Put ``<explain_dir>/grid_<method>.png`` of each method that has one into the active
    ``EventStorage`` as the image "explain/<dataset_name>/<method>" (CHW uint8 RGB, as
    ``EventStorage.put_image`` takes it). Outside training (no storage, e.g. ``--eval-only``)
    nothing is put.

    Returns:
        list[str]: the names of the images put.
    """
    # Detectron2 offers no query for an active storage; get_event_storage() asserts there is one.
    if not events._CURRENT_STORAGE_STACK:
        return []
    storage = events.get_event_storage()
    names = []
    for method in methods:
        path = os.path.join(explain_dir, f"grid_{method}.png")
        if not os.path.isfile(path):
            continue  # no image was explained: the evaluator drew no grid
        with Image.open(path) as image:
            grid = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
        name = f"explain/{dataset_name}/{method}"
        storage.put_image(name, np.ascontiguousarray(grid))
        names.append(name)
    return names
