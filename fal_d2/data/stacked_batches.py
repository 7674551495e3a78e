"""Hand a batch's images from the loader workers to the trainer as one tensor.

A DataLoader worker passes every tensor to the main process through its own shared-memory handle,
and the main process receives each one in turn (a file descriptor over a socket, about 0.4 ms).
Detectron2 batches are lists of dicts holding one image tensor each, so at 128 images per batch
the trainer spent about 50 ms per batch receiving images, in series with the training step: on an
H100 this, not decoding or the model, limited training to about 960 img/s. Stacking the images in
the worker sends one tensor per batch; the main process splits it back into per-image views, so
the model still gets Detectron2's list of dicts.
"""
import torch

from .mapper import ClassificationDatasetMapper
from .resumable_loader import build_resumable_train_loader

__all__ = ["stack_images", "unstack_images", "build_classification_train_loader"]


def stack_images(batch):
    """Collate function (runs in a worker): ``(images (N, C, H, W), dicts without "image")``."""
    images = torch.stack([record.pop("image") for record in batch])
    return images, batch


def unstack_images(batch):
    """Inverse of :func:`stack_images` (runs in the main process): the list of dicts, each with a
    view of its image."""
    images, records = batch
    for record, image in zip(records, images):
        record["image"] = image
    return records


def build_classification_train_loader(cfg):
    """The resumable training loader (:mod:`fal_d2.data.resumable_loader`) with the
    classification mapper, images sent stacked."""
    return build_resumable_train_loader(
        cfg, ClassificationDatasetMapper(cfg, is_train=True),
        collate_fn=stack_images, main_process_fn=unstack_images,
    )
