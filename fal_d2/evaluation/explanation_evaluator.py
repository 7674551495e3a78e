"""Explanation quality per saliency method, level and class, as a Detectron2 DatasetEvaluator.

Classifiers and detectors are evaluated the same way; what is explained and how O is measured
comes from the model's target (:mod:`fal_d2.explain.targets`):

* classifiers: the predicted (or ground-truth) class; rows per ground-truth class ("label");
* detectors: each image's top detection (:mod:`fal_d2.explain.detection_targets` has the rule:
  Y is its score, O the best score of a same-class detection with IoU >= 0.5 on E = S * I); rows
  per class of the top detection. Images with no detection are skipped and counted
  (``num_images_skipped``); heatmaps show the explained detection's box.
"""
import io
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from fal_d2.explain import SALIENCY_METHODS, applicable_levels
from fal_d2.explain.faithfulness import INSERTION_BASELINES, MASK_CONVENTIONS
from fal_d2.explain.scoring import score_explanations
from fal_d2.explain.build_target import build_target
from fal_d2.explain.visualize import (
    ExplanationSample,
    explanation_grid,
    sample_overlay,
    save_grid_figure,
)
from fal_d2.evaluation.budgets import (
    budget_metrics,
    budget_suffix,
    check_budget_mode,
    check_budgets,
)
from fal_d2.evaluation.labels import checked_label
from fal_d2.utils.atomic_io import atomic_write_bytes, atomic_write_json
from fal_d2.version import __version__

__all__ = ["ExplanationEvaluator"]

# Per (method, level, class) running sums; every reported metric is a ratio of two of them. The
# budgeted metrics (``budget_metrics``) follow these.
_METRICS = ("average_drop", "increase_in_confidence", "coverage", "deletion_auc", "insertion_auc")
TARGETS = ("pred", "gt")


def check_explain_config(cfg) -> None:
    """
    Check ``cfg.TEST.EXPLAIN`` when the config is set up, before any training, with one line
    naming the key and the allowed values (an evaluator would otherwise fail after training).
    """
    explain = cfg.TEST.EXPLAIN
    unknown = [name for name in explain.METHODS if name not in SALIENCY_METHODS]
    if unknown:
        raise ValueError(f"TEST.EXPLAIN.METHODS: unknown method(s) {unknown}; "
                         f"known: {sorted(SALIENCY_METHODS)}")
    if explain.MASK not in MASK_CONVENTIONS:
        raise ValueError(f"TEST.EXPLAIN.MASK={explain.MASK!r}; expected one of {MASK_CONVENTIONS}")
    check_budgets(explain.BUDGETS)
    check_budget_mode(explain.BUDGET_MODE)
    if explain.TARGET not in TARGETS:
        raise ValueError(f"TEST.EXPLAIN.TARGET={explain.TARGET!r}; expected one of {TARGETS}")
    if explain.INSERTION_BASELINE not in INSERTION_BASELINES:
        raise ValueError(f"TEST.EXPLAIN.INSERTION_BASELINE={explain.INSERTION_BASELINE!r}; "
                         f"expected one of {INSERTION_BASELINES}")
    for key in ("AUC_STEPS", "VIS_PER_CLASS"):
        if explain[key] < 0:
            raise ValueError(f"TEST.EXPLAIN.{key}={explain[key]} must be >= 0")
VIS_MAX_SIDE = 128  # kept visualisation images and maps are downscaled to at most this many pixels


class ExplanationEvaluator(DatasetEvaluator):
    """
    Average Drop %, Increase in Confidence % (Grad-CAM++) and RISE deletion/insertion AUC of
    saliency methods on the chosen backbone levels, overall and per class: the ground-truth class
    for classifiers, the top detection's class for detectors (see the module docstring).

    Explanations need gradients and the model, which Detectron2's ``inference_on_dataset`` does
    not give an evaluator: this one holds the model and re-runs the saliency methods on each
    batch's inputs (with gradients enabled inside ``process``); the model outputs passed to
    ``process`` are not used.

    Maps are also scored at fixed budgets (their top k % of pixels; by default kept at 1, so that
    only the maps' rankings are compared), and every row reports the maps' coverage: AD and IC of
    the whole map reward maps that keep more of the image.

    The state is a (method-level, class, metric) array of sums, each image's Average Drops (for
    Win % between models, a few numbers per image) and at most ``vis_per_class`` downscaled
    samples per class for the heatmap figures.

    After :meth:`evaluate`, on the main process, ``rows`` holds the metric rows (the
    ``explanation_metrics.json`` schema), ``per_image_drops`` each image's Average Drop by
    "method/level/metric" and image id, ``samples`` the kept samples in class order,
    ``method_levels`` the levels explained by each method and ``num_images_skipped`` the number
    of images with nothing to explain (a detector's images without a detection).
    """

    def __init__(
        self,
        dataset_name: str,
        model: torch.nn.Module,
        methods: Sequence[str],
        levels: Sequence[str],
        target: str = "pred",
        vis_per_class: int = 2,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        auc_steps: int = 16,
        insertion_baseline: str = "blur",
        mask: str = "normalized",
        budgets: Sequence[float] = (15, 50),
        budget_mode: str = "binary",
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``thing_classes``.
            model: the classifier or detector to explain (not wrapped in
                DistributedDataParallel).
            methods: names in :data:`fal_d2.explain.SALIENCY_METHODS`; a method is skipped, with
                a warning, on levels where it does not apply ("attention" without a branch).
            levels: backbone outputs to explain.
            target: "pred" explains the predicted class (a detector's top detection), "gt" the
                ground-truth class (classifiers only).
            vis_per_class: images per class kept for the heatmap figures.
            output_dir: where ``explanation_metrics.json``, heatmaps and grids go; None: nowhere.
            distributed: sum the partial sums of all workers and report on the main process only.
            auc_steps: steps of the deletion/insertion curves; 0 skips these metrics (they cost
                2 * (auc_steps + 1) forward passes per image, method and level).
            insertion_baseline: "blur" (RISE) or "zero", see :mod:`fal_d2.explain.faithfulness`.
            mask: what masked pixels become: "normalized" (the mean colour: pytorch-grad-cam's and
                TorchCAM's convention) or "pixel" (black).
            budgets: percentages of each map's top pixels at which AD and IC are also reported.
            budget_mode: "binary" (a budget keeps its pixels at 1: the ranking alone counts) or
                "valued" (at their values, TAME's rule); see
                :func:`fal_d2.explain.metrics.budget_saliency`.
        """
        if target not in TARGETS:
            raise ValueError(f"TEST.EXPLAIN.TARGET={target!r}; expected one of {TARGETS}")
        if vis_per_class < 0:
            raise ValueError(f"TEST.EXPLAIN.VIS_PER_CLASS={vis_per_class} must be >= 0")
        if insertion_baseline not in INSERTION_BASELINES:
            raise ValueError(
                f"insertion_baseline={insertion_baseline!r}; expected one of {INSERTION_BASELINES}"
            )
        if mask not in MASK_CONVENTIONS:
            raise ValueError(f"TEST.EXPLAIN.MASK={mask!r}; expected one of {MASK_CONVENTIONS}")
        self._mask = mask
        self._budgets = check_budgets(budgets)
        self._budget_mode = check_budget_mode(budget_mode)
        self._metrics = list(_METRICS) + budget_metrics(self._budgets)
        self._dataset_name = dataset_name
        self._class_names = _class_names(dataset_name)
        self._model = model
        self._explain_target = build_target(model)
        self.task = self._explain_target.task
        if target == "gt" and not self._explain_target.uses_image_labels:
            raise ValueError(
                f"TEST.EXPLAIN.TARGET='gt' needs one ground-truth class per image; a "
                f"{type(model).__name__} explains its top detection: use TARGET 'pred'"
            )
        self._target = target
        self._vis_per_class = vis_per_class
        self._output_dir = output_dir
        self._distributed = distributed
        self._auc_steps = auc_steps
        self._insertion_baseline = insertion_baseline
        self._rgb = getattr(model, "input_format", "RGB") == "RGB"
        self._logger = logging.getLogger(__name__)
        self._explainers = self._build_explainers(model, list(methods), list(levels))
        self.method_levels = {name: method.output_levels for name, method in self._explainers}
        self._keys = [
            (name, level) for name, levels in self.method_levels.items() for level in levels
        ]
        self.rows: List[dict] = []
        self.per_image_drops: Dict[str, Dict[str, float]] = {}
        self.samples: List[ExplanationSample] = []
        self.num_images_skipped = 0
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name, model, output_dir=None, distributed=True):
        """
        An evaluator configured by ``cfg.TEST.EXPLAIN`` (returns the instance, unlike Detectron2's
        ``@configurable`` ``from_config``). ``output_dir`` defaults to
        ``<TEST.EXPLAIN.OUTPUT_DIR or OUTPUT_DIR/explain>/<dataset_name>``.
        """
        explain = cfg.TEST.EXPLAIN
        if output_dir is None:
            root = explain.OUTPUT_DIR or os.path.join(cfg.OUTPUT_DIR, "explain")
            output_dir = os.path.join(root, dataset_name)
        return cls(
            dataset_name,
            model,
            methods=explain.METHODS,
            levels=explain.LEVELS,
            target=explain.TARGET,
            vis_per_class=explain.VIS_PER_CLASS,
            output_dir=output_dir,
            distributed=distributed,
            auc_steps=explain.AUC_STEPS,
            insertion_baseline=explain.INSERTION_BASELINE,
            mask=explain.MASK,
            budgets=explain.BUDGETS,
            budget_mode=explain.BUDGET_MODE,
        )

    def _build_explainers(self, model, methods: List[str], levels: List[str]):
        unknown = [name for name in methods if name not in SALIENCY_METHODS]
        if unknown:
            raise ValueError(
                f"TEST.EXPLAIN.METHODS: unknown method(s) {unknown}; "
                f"known: {sorted(SALIENCY_METHODS)}"
            )
        valid = list(model.backbone.output_shape())
        unknown = [level for level in levels if level not in valid]
        if unknown or not levels:
            raise ValueError(
                f"TEST.EXPLAIN.LEVELS: unknown level(s) {unknown or levels}; "
                f"the model's backbone produces {valid}"
            )
        explainers = []
        for name in methods:
            applicable, reasons = applicable_levels(name, model, levels, self._explain_target)
            for level, reason in reasons.items():
                self._logger.warning(
                    f"[ExplanationEvaluator] skipping {name!r} on {level}: {reason}"
                )
            if applicable:
                explainers.append(
                    (name, SALIENCY_METHODS[name](model, applicable, target=self._explain_target))
                )
        return explainers

    def reset(self):
        # column 0 counts images, then one column per metric
        self._sums = np.zeros((len(self._keys), len(self._class_names), 1 + len(self._metrics)))
        self._drops: Dict[str, Dict[str, float]] = defaultdict(dict)  # "method/level/metric" -> {id: drop}
        self._samples: Dict[int, List[ExplanationSample]] = {}
        self._num_skipped = 0

    def process(self, inputs, outputs):
        labels = [self._label_of(x) for x in inputs] if self._explain_target.uses_image_labels \
            else None
        targets = labels if self._target == "gt" else None
        new_samples, row_classes = {}, None
        with torch.enable_grad():
            for name, method in self._explainers:
                scores = score_explanations(
                    self._model, inputs, method, targets, self._auc_steps,
                    self._insertion_baseline, self._mask, self._budgets, self._budget_mode,
                )
                explained = scores.explained
                classes = labels if labels is not None else [
                    self._detected_class(c) for c in scores.target_classes.tolist()
                ]
                if row_classes is None:  # the first method: the samples and skips of the batch
                    row_classes = classes
                    self._num_skipped += int((~explained).sum())
                    for i in self._choose_samples(classes, explained):
                        new_samples[i] = self._new_sample(inputs[i], classes[i], scores, i)
                for level, level_scores in scores.levels.items():
                    self._add(self._keys.index((name, level)), classes, explained, level_scores)
                    self._add_drops(f"{name}/{level}", inputs, explained, level_scores)
                    for i, sample in new_samples.items():
                        if explained[i]:
                            self._record(sample, (name, level), level_scores, i)
        for i, sample in new_samples.items():
            self._samples.setdefault(row_classes[i], []).append(sample)

    def _add(self, key_index, classes, explained, level_scores):
        kept = np.flatnonzero(explained)
        rows = np.asarray(classes, dtype=np.int64)[kept]
        values = [level_scores.drop, level_scores.increase, level_scores.coverage,
                  level_scores.deletion_auc, level_scores.insertion_auc]
        for percent in self._budgets:
            budget = level_scores.budgets[percent]
            values += [budget.drop, budget.increase]
        np.add.at(self._sums[key_index, :, 0], rows, 1.0)
        for column, value in enumerate(values, start=1):
            if value is not None:
                np.add.at(self._sums[key_index, :, column], rows, value[kept])

    def _add_drops(self, prefix, inputs, explained, level_scores):
        """Each explained image's Average Drop, by image id, for Win % between models."""
        drops = {"average_drop": level_scores.drop}
        for percent in self._budgets:
            drops[f"average_drop{budget_suffix(percent)}"] = level_scores.budgets[percent].drop
        for i in np.flatnonzero(explained):
            image_id = str(inputs[i].get("image_id", inputs[i].get("file_name", i)))
            for metric, values in drops.items():
                self._drops[f"{prefix}/{metric}"][image_id] = float(values[i])

    def _detected_class(self, target_class: int) -> int:
        """A detector's explained class as a row index; -1 (nothing detected) stays -1."""
        if target_class >= len(self._class_names):
            raise ValueError(
                f"ExplanationEvaluator on '{self._dataset_name}': the model detected class "
                f"{target_class}, but the dataset has {len(self._class_names)} classes; the "
                f"model's NUM_CLASSES must match the dataset"
            )
        return target_class

    def _label_of(self, input_) -> int:
        return checked_label(input_, self._class_names, "ExplanationEvaluator", self._dataset_name)

    def _choose_samples(self, labels, explained) -> List[int]:
        """The first ``vis_per_class`` explained images of each class, in data order."""
        taken = {label: len(samples) for label, samples in self._samples.items()}
        chosen = []
        for i, label in enumerate(labels):
            if explained[i] and taken.get(label, 0) < self._vis_per_class:
                taken[label] = taken.get(label, 0) + 1
                chosen.append(i)
        return chosen

    def _new_sample(self, input_, class_label, scores, i) -> ExplanationSample:
        image = _downscale(input_["image"].float()[None])[0]
        if not self._rgb:
            image = image.flip(0)
        target_name = self._class_names[int(scores.target_classes[i])]
        sample = ExplanationSample(
            image_id=str(input_.get("image_id", input_.get("file_name", ""))),
            image=image.round().clamp(0, 255).byte().permute(1, 2, 0).numpy(),
            class_name=self._class_names[class_label],
            target_name=target_name,
        )
        if scores.boxes is not None:
            scale_y = image.shape[-2] / input_["image"].shape[-2]
            scale_x = image.shape[-1] / input_["image"].shape[-1]
            x0, y0, x1, y1 = scores.boxes[i].tolist()
            sample.box = (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)
            sample.box_caption = f"{target_name} {scores.confidence[i]:.2f}"
        return sample

    @staticmethod
    def _record(sample, key, level_scores, i):
        saliency = _downscale(level_scores.saliency[i].cpu()[None, None])[0, 0]
        sample.maps[key] = (saliency * 255).round().clamp(0, 255).byte().numpy()
        sample.drop[key] = float(level_scores.drop[i])
        sample.increase[key] = bool(level_scores.increase[i] > 0)

    def evaluate(self):
        if self._distributed:
            gathered = comm.all_gather((self._sums, self._samples, self._num_skipped,
                                        dict(self._drops)))
            if not comm.is_main_process():
                return {}
            sums = np.sum([g[0] for g in gathered], axis=0)
            samples, drops = {}, defaultdict(dict)
            for _, worker_samples, _, worker_drops in gathered:
                for label, label_samples in worker_samples.items():
                    samples.setdefault(label, []).extend(label_samples)
                for key, values in worker_drops.items():
                    drops[key].update(values)
            self.num_images_skipped = sum(g[2] for g in gathered)
        else:
            sums, samples, drops = self._sums, self._samples, self._drops
            self.num_images_skipped = self._num_skipped
        self.per_image_drops = dict(drops)
        if self.num_images_skipped:
            self._logger.info(
                f"[ExplanationEvaluator] {self.num_images_skipped} image(s) of "
                f"'{self._dataset_name}' had nothing to explain (no detection) and were skipped."
            )
        if sums[..., 0].sum() == 0:
            self._logger.warning(
                f"[ExplanationEvaluator] No images were explained on '{self._dataset_name}' "
                f"({self.num_images_skipped} skipped)."
            )
            return {}

        self.rows = self._rows(sums)
        self.samples = [
            sample
            for label in sorted(samples)
            for sample in samples[label][: self._vis_per_class]
        ]
        results = OrderedDict()
        for row in self.rows:
            if row["class"] == "all":
                for metric in self._metrics:
                    if row[metric] is not None:
                        results[f"{row['method']}/{row['level']}/{metric}"] = row[metric]
        if self.task == "detection":
            results["num_images_skipped"] = self.num_images_skipped
        self._logger.info(
            f"Explanations on '{self._dataset_name}': "
            + ", ".join(f"{key} {value:.3f}" for key, value in results.items())
        )
        if self._output_dir and comm.is_main_process():
            self._write_outputs()
        return OrderedDict({"explanation": results})

    def _rows(self, sums) -> List[dict]:
        """One row per (method, level) for all classes, then per class with images."""
        rows = []
        for (method, level), key_sums in zip(self._keys, sums):
            per_class = [("all", key_sums.sum(axis=0))] + list(zip(self._class_names, key_sums))
            for class_name, class_sums in per_class:
                num_images = int(class_sums[0])
                if num_images == 0:
                    continue
                row = {"method": method, "level": level, "class": class_name}
                for column, metric in enumerate(self._metrics, start=1):
                    auc = metric.endswith("_auc")
                    row[metric] = None if auc and self._auc_steps == 0 else float(
                        class_sums[column] / num_images
                    )
                row["num_images"] = num_images
                rows.append(row)
        return rows

    def _write_outputs(self):
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_write_json(
            os.path.join(self._output_dir, "explanation_metrics.json"),
            {
                "fal_d2_version": __version__,
                "dataset": self._dataset_name,
                "task": self.task,
                "target": self._target,
                "num_images_skipped": self.num_images_skipped,
                "auc_steps": self._auc_steps,
                "insertion_baseline": self._insertion_baseline,
                "mask": self._mask,
                "budgets": self._budgets,
                "budget_mode": self._budget_mode,
                "rows": self.rows,
                "per_image_drop": self.per_image_drops,
            },
        )
        index_in_class = defaultdict(int)
        for sample in self.samples:
            index = index_in_class[sample.class_name]
            index_in_class[sample.class_name] += 1
            for method, level in sample.maps:
                folder = os.path.join(self._output_dir, "heatmaps", method, level)
                os.makedirs(folder, exist_ok=True)
                overlay = sample_overlay(sample, (method, level))
                _write_png(os.path.join(folder, f"{sample.class_name}_{index}.png"), overlay)
        if not self.samples:
            return
        for method, levels in self.method_levels.items():
            rows, columns, row_labels = explanation_grid([("", self.samples)], method, [levels])
            save_grid_figure(
                rows,
                columns,
                os.path.join(self._output_dir, f"grid_{method}.png"),
                row_labels=row_labels,
                title=f"{method} on '{self._dataset_name}' (target: "
                f"{'top detection' if self.task == 'detection' else self._target})",
            )


def _class_names(dataset_name) -> List[str]:
    """The dataset's ``thing_classes``; a COCO-format set registered without them sets them when
    it is first loaded."""
    metadata = MetadataCatalog.get(dataset_name)
    if metadata.get("thing_classes") is None and dataset_name in DatasetCatalog.list():
        DatasetCatalog.get(dataset_name)
    classes = metadata.get("thing_classes")
    if classes is None:
        raise ValueError(f"ExplanationEvaluator: dataset '{dataset_name}' has no thing_classes")
    return list(classes)


def _downscale(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> at most VIS_MAX_SIDE pixels on the longer side (area averaging)."""
    height, width = images.shape[-2:]
    scale = VIS_MAX_SIDE / max(height, width)
    if scale >= 1:
        return images
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="area")


def _write_png(path, image_rgb):
    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
