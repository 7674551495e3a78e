"""Exact resume: a run killed after a checkpoint and resumed ends with the weights of a run that
was never interrupted.

Detectron2 v0.6's trainer state holds the iteration and the state of every hook that has one (the
LR scheduler's, through its ``LRScheduler`` hook; an EMA hook's). It lacks:

* the optimizer (SGD momentum) and the AMP grad scaler: v0.6's ``DefaultTrainer`` does not save
  its inner ``SimpleTrainer``; later Detectron2 saves it as ``"_trainer"``, and so does
  :class:`ExactResumeMixin`;
* where the data stream was: ``TrainingSampler`` restarts from its seed, so a resumed run sees the
  first batches again. :class:`ExactResume` saves the :class:`~fal_d2.data.ResumableTrainLoader`'s
  seed and sample position;
* the random draws of the training step (dropout, in-model augmentation): :class:`ExactResume`
  seeds Python's, NumPy's and torch's RNGs (CPU and CUDA) from (seed, rank, iteration) before
  every iteration. So the draws need no saved RNG state, hold for every rank (only rank 0 writes
  checkpoints), and do not depend on what ran between two steps (evaluation, PreciseBN).

A checkpoint written before this existed still resumes, with a one-line warning that the resume
is not exact.
"""
import logging

from detectron2.engine import HookBase
from detectron2.utils import comm

from fal_d2.data import ResumableTrainLoader, training_seed
from fal_d2.data.seeded_rng import seed_global_rngs

__all__ = ["ExactResume", "ExactResumeMixin"]

logger = logging.getLogger(__name__)


class ExactResume(HookBase):
    """Seeds each iteration's random draws and checkpoints the data position (module docstring).
    Register it first, so that no other hook's ``before_step`` draws before the seeding."""

    def __init__(self, seed: int, data_loader=None):
        """
        Args:
            seed (int): the run's seed.
            data_loader (ResumableTrainLoader or None): the training loader; None when the
                trainer's loader cannot be repositioned (its data order restarts on resume).
        """
        self.seed = int(seed)
        self.data_loader = data_loader

    @classmethod
    def for_trainer_loader(cls, data_loader, cfg):
        """The hook for a trainer's loader: its seed when it is resumable, else the run's."""
        if isinstance(data_loader, ResumableTrainLoader):
            return cls(data_loader.seed, data_loader)
        return cls(training_seed(cfg))

    def before_step(self):
        seed_global_rngs(self.seed, comm.get_rank(), self.trainer.iter)

    def state_dict(self):
        state = {"seed": self.seed}
        if self.data_loader is not None:
            state["data"] = self.data_loader.state_dict()
        return state

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])
        if self.data_loader is not None and "data" in state_dict:
            self.data_loader.load_state_dict(state_dict["data"])


class ExactResumeMixin:
    """For a ``DefaultTrainer`` subclass (``class Trainer(ExactResumeMixin, DefaultTrainer)``):
    registers :class:`ExactResume` first, checkpoints the optimizer and grad scaler, and warns,
    in one line, when a resumed checkpoint lacks any of it."""

    def build_hooks(self):
        self.exact_resume = ExactResume.for_trainer_loader(self.data_loader, self.cfg)
        return [self.exact_resume] + super().build_hooks()

    def state_dict(self):
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()  # the optimizer, AMP's grad scaler
        return state

    def load_state_dict(self, state_dict):
        missing = []
        if "_trainer" not in state_dict:
            missing.append("optimizer state (momentum restarts at 0)")
        hook_state = state_dict.get("hooks", {}).get(type(self.exact_resume).__qualname__, {})
        loader = self.exact_resume.data_loader
        if not hook_state:
            missing.append("RNG seed")
        if loader is None:
            missing.append("data position (this training loader cannot be repositioned)")
        elif "data" not in hook_state:
            missing.append("data position")
            # At least go on at the right sample count, with this run's seed.
            loader.skip_to((state_dict["iteration"] + 1) * loader.total_batch_size)
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if missing:
            source = getattr(self.checkpointer, "loaded_file", None) or "the checkpoint"
            logger.warning(f"resume from {source} is not exact: it has no {', no '.join(missing)} "
                           f"(written before exact resume); training goes on from iteration "
                           f"{state_dict['iteration'] + 1} with other samples or random draws "
                           f"than an uninterrupted run")
