"""An inference loader like Detectron2's, with a batch size.

Detectron2 v0.6's ``build_detection_test_loader`` always batches one image, its convention for
reported inference times. Explanation metrics run several forward and backward passes per image,
which on a GPU are launch-bound at batch 1: batching them is what makes evaluating on the GPU
cheap. Samples are still split over ranks by ``InferenceSampler``, so evaluators see each image
exactly once.
"""
import torch.utils.data as torchdata

from detectron2.data import DatasetFromList, MapDataset
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler

__all__ = ["build_batched_test_loader"]


def build_batched_test_loader(dataset, *, mapper, batch_size=1, num_workers=0):
    """
    Args:
        dataset (list[dict] or torch Dataset): dataset dicts, e.g. ``DatasetCatalog.get(name)``.
        mapper (callable): dataset dict -> model input.
        batch_size (int): images per batch on each rank (TEST.IMS_PER_BATCH).
        num_workers (int): loader processes.

    Returns:
        a DataLoader yielding lists of at most ``batch_size`` mapped dicts, in dataset order.
    """
    if batch_size < 1:
        raise ValueError(f"TEST.IMS_PER_BATCH must be at least 1, got {batch_size}")
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    return torchdata.DataLoader(
        MapDataset(dataset, mapper),
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset)),
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )
