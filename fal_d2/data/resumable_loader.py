"""A training loader that a checkpoint can put back where it was: exact resume.

It yields what Detectron2's ``build_detection_train_loader`` yields (per-rank batches of mapped
samples from an endless shuffled stream, sharded over ranks as ``TrainingSampler`` does), but
batch k of a rank is a pure function of (seed, k): the samples at rank-stream positions
[k * b, (k + 1) * b) of a :class:`SampleStream`. Loader worker w builds batches w, w + W, ...,
which PyTorch's DataLoader hands out round-robin, i.e. in batch order, so the batches do not
depend on the number of workers or on how far they prefetched. The loader counts what it has
handed to the trainer; ``state_dict`` / ``load_state_dict`` carry that position and the seed.

Global sample position p is rank (p mod world size)'s position p // world size, so global batch k
covers positions [k * B, (k + 1) * B) whatever the world size.

With ``aspect_ratio_grouping`` (detection), single samples come in stream order and Detectron2's
``AspectRatioGroupedDataset`` batches them in the main process; the samples waiting in its
buckets at a checkpoint are not in the checkpoint, so that resume continues at the right stream
position but is not exact.
"""
import itertools
import logging
import operator

import torch
import torch.utils.data as torchdata

from detectron2.data import get_detection_dataset_dicts
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.utils import comm

from .sample_stream import SampleStream, training_seed

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


def _as_list(batch):
    return batch


class _RankBatches(torchdata.IterableDataset):
    """Worker side: this worker's share of one rank's batches, from batch ``first_batch`` on."""

    def __init__(self, samples: SampleStream, *, rank, world_size, first_position, batch_size,
                 collate_fn):
        self.samples = samples
        self.rank, self.world_size = rank, world_size
        self.first_position = first_position  # in this rank's stream
        self.batch_size = batch_size
        self.collate_fn = collate_fn

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in itertools.count(worker, num_workers):
            start = self.first_position + batch * self.batch_size
            yield self.collate_fn([
                self.samples.sample_at(position * self.world_size + self.rank)
                for position in range(start, start + self.batch_size)
            ])


class ResumableTrainLoader:
    """An endless training loader with ``state_dict`` / ``load_state_dict`` (see the module
    docstring). Iterating it is lazy: nothing starts until the first batch is asked for, so a
    trainer may load a checkpoint after taking ``iter()`` of it (v0.6's SimpleTrainer does, in
    its constructor, before ``resume_or_load``)."""

    def __init__(self, dataset, mapper, *, seed, total_batch_size, num_workers=0,
                 collate_fn=None, aspect_ratio_grouping=False, main_process_fn=None):
        """
        Args:
            dataset, mapper, seed: see :class:`SampleStream`.
            total_batch_size (int): samples per step over all ranks (SOLVER.IMS_PER_BATCH).
            num_workers (int): DataLoader worker processes.
            collate_fn (callable): list of samples -> batch; runs in the worker (or, with
                ``aspect_ratio_grouping``, in the main process). Default: the list itself.
            aspect_ratio_grouping (bool): batch samples of like aspect ratio (not exact on resume).
            main_process_fn (callable): applied to each batch in the main process.
        """
        self.world_size = comm.get_world_size()
        self.rank = comm.get_rank()
        if total_batch_size <= 0 or total_batch_size % self.world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive "
                             f"multiple of the number of processes ({self.world_size})")
        self.samples = SampleStream(dataset, mapper, seed)
        self.total_batch_size = total_batch_size
        self.batch_size = total_batch_size // self.world_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn or _as_list
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.main_process_fn = main_process_fn
        self.position = 0  # global samples handed to the trainers of all ranks
        self._started = False

    @property
    def seed(self) -> int:
        return self.samples.seed

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position,
                "total_batch_size": self.total_batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's position with its seed. A checkpoint of another batch size
        or world size continues from the same sample position, with a warning."""
        if self._started:
            raise RuntimeError("ResumableTrainLoader.load_state_dict: the loader is already "
                               "running; load the checkpoint before the first batch")
        self.samples = SampleStream(self.samples.dataset, self.samples.mapper, state["seed"])
        position = int(state["position"])
        if state["total_batch_size"] != self.total_batch_size:
            logger.warning(f"resume is not exact: the checkpoint was trained with "
                           f"SOLVER.IMS_PER_BATCH={state['total_batch_size']}, this run uses "
                           f"{self.total_batch_size}; continuing from sample {position}")
        elif state["world_size"] != self.world_size:
            logger.warning(f"resume: the checkpoint ran on {state['world_size']} process(es), "
                           f"this run on {self.world_size}: same samples per step, but each "
                           f"process's share (and per-process BatchNorm statistics) differ")
        self.skip_to(position)

    def skip_to(self, position: int) -> None:
        """Start at global sample ``position`` (rounded up to a whole step of all ranks)."""
        if self._started:
            raise RuntimeError("ResumableTrainLoader.skip_to: the loader is already running")
        self.position = -(-position // self.world_size) * self.world_size

    def __iter__(self):
        self._started = True
        rank_batches = _RankBatches(
            self.samples, rank=self.rank, world_size=self.world_size,
            first_position=self.position // self.world_size,
            batch_size=1 if self.aspect_ratio_grouping else self.batch_size,
            collate_fn=operator.itemgetter(0) if self.aspect_ratio_grouping else self.collate_fn,
        )
        # batch_size=None: the dataset yields whole batches. Its own generator: starting the
        # workers must not draw from torch's global RNG, which the trainer's steps use.
        loader = torchdata.DataLoader(rank_batches, batch_size=None, num_workers=self.num_workers,
                                      generator=torch.Generator())
        if self.aspect_ratio_grouping:
            batches = map(self.collate_fn,
                          AspectRatioGroupedDataset(self._counted(loader, 1), self.batch_size))
        else:
            batches = self._counted(loader, self.batch_size)
        for batch in batches:
            yield self.main_process_fn(batch) if self.main_process_fn else batch

    def _counted(self, loader, samples_per_item):
        for item in loader:
            self.position += samples_per_item * self.world_size
            yield item


def build_resumable_train_loader(cfg, mapper, *, collate_fn=None, main_process_fn=None):
    """The :class:`ResumableTrainLoader` for ``cfg.DATASETS.TRAIN``, with the records, seed,
    batch size, workers and grouping Detectron2's ``build_detection_train_loader(cfg)`` uses."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: the "
                         f"resumable loader implements 'TrainingSampler' only")
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return ResumableTrainLoader(
        dataset, mapper, seed=training_seed(cfg), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=collate_fn,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        main_process_fn=main_process_fn,
    )
