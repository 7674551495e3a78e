"""The training samples as a pure function of (seed, position), so a run can restart anywhere.

Detectron2's ``TrainingSampler`` draws each epoch's permutation from one generator that runs on
from the seed, and its loader workers draw augmentations from RNGs seeded per worker: position N
of the stream can only be reached by replaying it from the start, and what a sample's augmentation
is depends on which worker maps it. Here epoch e's permutation comes from a generator seeded with
(seed, e), and the mapper runs with the global RNGs seeded from (seed, position), so the sample at
any position, augmentation included, is known without the ones before it.
"""
import logging

import torch

from detectron2.utils import comm

from .seeded_rng import derived_seed, global_rngs_seeded

__all__ = ["SampleStream", "training_seed"]

_MAX_MAPPING_ATTEMPTS = 10


def training_seed(cfg) -> int:
    """The run's seed: ``SEED`` when set, else one random seed shared by all ranks."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class SampleStream:
    """An endless shuffled stream of mapped samples: position p holds
    ``mapper(dataset[permutation(seed, p // size)[p % size]])``, mapped under RNGs seeded from
    (seed, p). It holds no position itself, so loader workers can share it."""

    def __init__(self, dataset, mapper, seed: int):
        """
        Args:
            dataset (list or map-style dataset): the records, e.g. dataset dicts.
            mapper (callable): record -> model input, drawing from the global RNGs; may return
                None to skip a record (Detectron2's convention).
            seed (int): the run's seed.
        """
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = dataset
        self.mapper = mapper
        self.seed = int(seed)
        self._epoch = None
        self._permutation = None

    def index_at(self, position: int) -> int:
        """The dataset index at a stream position."""
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._permutation = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[offset]

    def sample_at(self, position: int):
        """The mapped sample at a stream position. A record the mapper skips (None) is replaced
        by one drawn from (seed, position, attempt), so the stream stays a pure function."""
        index = self.index_at(position)
        for attempt in range(_MAX_MAPPING_ATTEMPTS):
            with global_rngs_seeded(self.seed, position, attempt):
                sample = self.mapper(self.dataset[index])
            if sample is not None:
                return sample
            logging.getLogger(__name__).warning(
                f"the mapper skipped dataset record {index}; using another in its place")
            index = derived_seed(self.seed, position, attempt, 1) % len(self.dataset)
        raise RuntimeError(f"the mapper skipped {_MAX_MAPPING_ATTEMPTS} records in a row at "
                           f"stream position {position}; check the dataset and mapper")
