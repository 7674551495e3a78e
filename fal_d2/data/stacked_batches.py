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

from detectron2.data import build_detection_train_loader

from .mapper import ClassificationDatasetMapper

__all__ = ["stack_images", "UnstackedImages", "build_classification_train_loader"]


def stack_images(batch):
    """Collate function (runs in a worker): ``(images (N, C, H, W), dicts without "image")``."""
    images = torch.stack([record.pop("image") for record in batch])
    return images, batch


class UnstackedImages:
    """Iterate a loader of :func:`stack_images` batches as lists of dicts with per-image views."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for images, records in self.loader:
            for record, image in zip(records, images):
                record["image"] = image
            yield records


def build_classification_train_loader(cfg):
    """Detectron2's training loader with the classification mapper, images sent stacked."""
    loader = build_detection_train_loader(
        cfg, mapper=ClassificationDatasetMapper(cfg, is_train=True), collate_fn=stack_images
    )
    return UnstackedImages(loader)
