"""Checked weights and atomic checkpoints: a missing, damaged or ill-fitting weights file fails
with one line, instead of a model that quietly runs with random or half-loaded weights.

:class:`FALCheckpointer` is Detectron2's ``DetectionCheckpointer`` with these changes:

* **Fit.** After loading, missing, unexpected and wrongly shaped tensors fail with one line that
  counts each kind and names an example. ``MODEL.WEIGHTS_PARTIAL`` opts into loading what fits.
  When MODEL.WEIGHTS only initialises a training run (``training=True``), the file may lack what
  the run creates: the attention branches and the heads (those may also have another shape, e.g.
  another class count), and, from a trunk-only ImageNet file (Detectron2's ``.pkl``/``.pyth``,
  matched by name heuristics), everything but the ResNet trunk. One line summarises that. A run
  that trains only some parts (``new_prefixes``: the explanation head's second stage) may lack
  those alone, and needs a file.
* **Unreadable files** (empty, text, a truncated archive) fail with one line naming the file and
  what is wrong with it.
* **Atomic saves.** A checkpoint is written to a temp file and renamed, so no partial checkpoint
  (a full disk, a kill) ever has a real name; ``last_checkpoint`` too.
* **Resume fallback.** When ``last_checkpoint`` is empty or names an unreadable file, resuming
  uses the newest intact ``model_*.pth`` and logs which file it skipped and why.
"""
import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from typing import List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone import ResNet

from fal_d2.utils.atomic_io import atomic_open, atomic_write_text

__all__ = ["FALCheckpointer", "WeightsError", "check_weights_given", "file_sha256", "load_weights",
           "unreadable_reason"]

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"model_(\d+|final)\.pth$")


class WeightsError(ValueError):
    """A weights file that is absent, unreadable or does not fit the model; one-line message."""


def unreadable_reason(path: str) -> Optional[str]:
    """
    Why the file at ``path`` cannot be a checkpoint, judged from its size and first bytes
    (cheap: nothing is unpickled), or None when it may be one: a zip archive with its end record
    (``torch.save``) or a pickle (legacy ``torch.save``, Detectron2's ``.pkl``).
    """
    if not os.path.isfile(path):
        return "no such file"
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        if zipfile.is_zipfile(path):
            return None
        return f"the zip archive is truncated or damaged ({size} bytes, no end record)"
    if head.startswith(b"\x80"):
        return None
    return f"neither a PyTorch zip archive nor a pickle (it starts with {head!r})"


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in chunks: it names exactly which weights were evaluated."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_given(weights: str, allow_random_weights: bool, what: str, opt_in: str) -> None:
    """Fail when there are no weights and random ones were not asked for: a random model still
    gives numbers, and nothing downstream would tell them from real ones."""
    if not weights and not allow_random_weights:
        raise WeightsError(
            f"{what}: MODEL.WEIGHTS is empty, so the model would run with random weights; "
            f"give a checkpoint, or {opt_in} to run it anyway"
        )


def load_weights(model, cfg, *, allow_random_weights=False, what="model",
                 opt_in="--allow-random-weights") -> Optional[str]:
    """
    Load ``cfg.MODEL.WEIGHTS`` into ``model`` for inference; every tensor must fit unless
    ``MODEL.WEIGHTS_PARTIAL``. Returns the local path of the file loaded, or None when it was
    empty and ``allow_random_weights``.
    """
    check_weights_given(cfg.MODEL.WEIGHTS, allow_random_weights, what, opt_in)
    if not cfg.MODEL.WEIGHTS:
        logger.warning(f"{what}: no weights ({opt_in}): the model is randomly initialised")
        return None
    checkpointer = FALCheckpointer(model, partial=cfg.MODEL.WEIGHTS_PARTIAL)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    return checkpointer.loaded_file


def _mismatch_summary(missing: List[str], unexpected: List[str], shapes: List[tuple]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model missing from the file "
                     f"(e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) of the file not in the model "
                     f"(e.g. {unexpected[0]})")
    if shapes:
        key, file_shape, model_shape = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {key}: {tuple(file_shape)} in the "
                     f"file, {tuple(model_shape)} in the model)")
    return ", ".join(parts)


class FALCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with checked loads, atomic saves and a resume fallback (see the
    module docstring). After :meth:`load`, ``loaded_file`` is the local path that was read."""

    def __init__(self, model, save_dir="", *, partial=False, training=False, new_prefixes=None,
                 save_to_disk=None, **checkpointables):
        """
        Args:
            partial: load the tensors that fit and summarise the rest in one warning
                (``MODEL.WEIGHTS_PARTIAL``), instead of failing.
            training: the model is about to be trained, so the weights given to
                :meth:`resume_or_load` without a checkpoint to resume may lack the parts the run
                creates (branches, heads). A resumed checkpoint must always fit.
            new_prefixes: with ``training``, the state-dict prefixes of the only tensors that
                file may lack or hold in another shape, e.g. ``("explanation_head.",)`` when the
                run trains the explanation head alone; None: the rule above.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.partial = partial
        self.training = training
        self.new_prefixes = tuple(new_prefixes) if new_prefixes is not None else None
        self.loaded_file: Optional[str] = None
        self._initialising = False
        self._trunk_only_file = False

    # ---- loading -------------------------------------------------------------------------------

    def load(self, path, checkpointables=None):
        self.loaded_file = None
        if path and "://" not in path and not os.path.isfile(path):
            raise WeightsError(f"{path}: no such weights file")
        return super().load(path, checkpointables)

    def resume_or_load(self, path, *, resume=True):
        """Detectron2's: resume from this run's last checkpoint if asked and there is one, else
        load ``path``; with ``training``, that file only initialises the run."""
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file())
        if self.training and self.new_prefixes is not None and not path:
            raise WeightsError(f"MODEL.WEIGHTS is empty, but this run trains only "
                               f"{self._new_parts_text()}: give the weights of the rest")
        self._initialising = self.training
        try:
            return self.load(path, checkpointables=[])
        finally:
            self._initialising = False

    def _load_file(self, filename):
        try:
            checkpoint = super()._load_file(filename)
        except Exception as error:  # torch.load and pickle raise anything for a bad file
            reason = unreadable_reason(filename)
            if reason is None:
                first_line = (str(error).strip().splitlines() or [""])[0]
                reason = f"{type(error).__name__}: {first_line}"
            raise WeightsError(f"{filename}: cannot be read as a checkpoint: {reason}") from error
        if not isinstance(checkpoint.get("model"), Mapping):
            raise WeightsError(f"{filename}: holds no state dict of tensors (a 'model' mapping)")
        self.loaded_file = filename
        self._trunk_only_file = bool(checkpoint.get("matching_heuristics", False))
        return checkpoint

    def _log_incompatible_keys(self, incompatible):
        """Replaces the per-tensor warnings (hundreds of lines for a wrong file) with a check and
        one summary line."""
        # BatchNorm fills in a missing num_batches_tracked without reporting it: not counted.
        counted = {key for key in self.model.state_dict() if not key.endswith("num_batches_tracked")}
        shapes = list(incompatible.incorrect_shapes)
        # A tensor of another shape is reported missing too; count it once.
        counted -= {key for key, _, _ in shapes}
        missing = [key for key in incompatible.missing_keys if key in counted]
        unexpected = list(incompatible.unexpected_keys)
        num_tensors = len(counted) + len(shapes)
        loaded = num_tensors - len(missing) - len(shapes)
        where = f"{self.loaded_file}: {loaded} of the model's {num_tensors} tensors loaded"
        if loaded <= 0:
            raise WeightsError(f"{self.loaded_file}: no tensor fits the "
                               f"{type(self.model).__name__}: "
                               f"{_mismatch_summary(missing, unexpected, shapes)}")
        new = []
        if self._initialising:
            may_lack, may_reshape = self._new_part_tests()
            new = [key for key in missing if may_lack(key)]
            new += [key for key, _, _ in shapes if may_reshape(key)]
            missing = [key for key in missing if not may_lack(key)]
            shapes = [shape for shape in shapes if not may_reshape(shape[0])]
        mismatch = _mismatch_summary(missing, unexpected, shapes)
        if mismatch and not self.partial:
            only = (f" (this run trains only {self._new_parts_text()}: the file must hold "
                    f"every other tensor)" if self._initialising and self.new_prefixes else "")
            raise WeightsError(
                f"{self.loaded_file} does not fit the {type(self.model).__name__}: {mismatch}"
                f"{only}; set MODEL.WEIGHTS_PARTIAL True to load only what fits"
            )
        if mismatch:
            self.logger.warning(f"{where} (MODEL.WEIGHTS_PARTIAL); not loaded: {mismatch}")
        elif new:
            self.logger.info(f"{where}; {len(new)} new one(s) keep their initialisation "
                             f"(e.g. {new[0]})")

    def _new_parts_text(self) -> str:
        return ", ".join(f"{prefix}*" for prefix in self.new_prefixes)

    def _new_part_tests(self):
        """Tests of whether a weights file that initialises training may lack a tensor, and
        whether it may hold one in another shape (the heads, e.g. for another class count)."""
        if self.new_prefixes is not None:
            def only_new(key: str) -> bool:
                return key.startswith(self.new_prefixes)

            return only_new, only_new
        trunks = tuple(f"{name}." for name, module in self.model.named_modules()
                       if isinstance(module, ResNet))
        trunk_only = self._trunk_only_file and bool(trunks)

        def is_new(key: str) -> bool:
            if ".attention_branches." in key or not key.startswith("backbone."):
                return True
            return trunk_only and not key.startswith(trunks)

        return is_new, lambda key: not key.startswith("backbone.")

    # ---- saving --------------------------------------------------------------------------------

    def save(self, name, **kwargs):
        """Detectron2's save, through a temp file and a rename."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_open(path) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ---- resuming ------------------------------------------------------------------------------

    def get_checkpoint_file(self):
        """
        The checkpoint to resume from: the one ``last_checkpoint`` names or, when it is empty or
        names an unreadable file, the newest intact ``model_*.pth`` (by iteration; ``final``
        last). "" without ``last_checkpoint``.
        """
        try:
            with open(os.path.join(self.save_dir, "last_checkpoint")) as f:
                name = f.read().strip()
        except OSError:
            return ""
        tagged = os.path.join(self.save_dir, name) if name else None
        if tagged:
            reason = unreadable_reason(tagged)
            if reason is None:
                return tagged
            skipped = f"{tagged} ({reason})"
        else:
            skipped = f"{os.path.join(self.save_dir, 'last_checkpoint')} (it is empty)"
        for candidate in self._checkpoints_newest_first():
            if candidate != tagged and unreadable_reason(candidate) is None:
                self.logger.warning(f"resume: skipped {skipped}; resuming from {candidate}")
                return candidate
        raise WeightsError(f"resume: {skipped} and no other intact model_*.pth in "
                           f"{self.save_dir}; delete last_checkpoint to start over")

    def _checkpoints_newest_first(self) -> List[str]:
        def iteration(name):
            number = _CHECKPOINT_NAME.match(name).group(1)
            return float("inf") if number == "final" else int(number)

        names = [name for name in os.listdir(self.save_dir) if _CHECKPOINT_NAME.match(name)]
        return [os.path.join(self.save_dir, name)
                for name in sorted(names, key=iteration, reverse=True)]
