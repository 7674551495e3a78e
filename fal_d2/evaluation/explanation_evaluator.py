"""Explanation quality per saliency method, level and class, as a Detectron2 DatasetEvaluator."""
import io
import logging
import operator
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from fal_d2.explain import SALIENCY_METHODS
from fal_d2.explain.faithfulness import INSERTION_BASELINES
from fal_d2.explain.scoring import score_explanations
from fal_d2.explain.visualize import (
    ExplanationSample,
    explanation_grid,
    overlay_heatmap,
    save_grid_figure,
)
from fal_d2.utils.atomic_io import atomic_write_bytes, atomic_write_json

__all__ = ["ExplanationEvaluator"]

# Per (method, level, class) running sums; every reported metric is a ratio of two of them.
_SUMS = ("num_images", "average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc")
_METRICS = _SUMS[1:]
TARGETS = ("pred", "gt")
VIS_MAX_SIDE = 128  # kept visualisation images and maps are downscaled to at most this many pixels


class ExplanationEvaluator(DatasetEvaluator):
    """
    Average Drop %, Increase in Confidence % (Grad-CAM++) and RISE deletion/insertion AUC of
    saliency methods on the chosen backbone levels, overall and per ground-truth class.

    Explanations need gradients and the model, which Detectron2's ``inference_on_dataset`` does
    not give an evaluator: this one holds the model and re-runs the saliency methods on each
    batch's inputs (with gradients enabled inside ``process``); the model outputs passed to
    ``process`` are not used.

    Memory does not grow with the dataset: the state is a (method-level, class, 5) array of sums
    and at most ``vis_per_class`` downscaled samples per class for the heatmap figures.

    After :meth:`evaluate`, on the main process, ``rows`` holds the metric rows (the
    ``explanation_metrics.json`` schema), ``samples`` the kept samples in class order and
    ``method_levels`` the levels explained by each method.
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
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``thing_classes``.
            model: the classifier to explain (not wrapped in DistributedDataParallel).
            methods: names in :data:`fal_d2.explain.SALIENCY_METHODS`; a method is skipped, with
                a warning, on levels where it does not apply ("attention" without a branch).
            levels: backbone outputs to explain.
            target: "pred" explains the predicted class, "gt" the ground-truth one.
            vis_per_class: images per class kept for the heatmap figures.
            output_dir: where ``explanation_metrics.json``, heatmaps and grids go; None: nowhere.
            distributed: sum the partial sums of all workers and report on the main process only.
            auc_steps: steps of the deletion/insertion curves; 0 skips these metrics (they cost
                2 * (auc_steps + 1) forward passes per image, method and level).
            insertion_baseline: "blur" (RISE) or "zero", see :mod:`fal_d2.explain.faithfulness`.
        """
        if target not in TARGETS:
            raise ValueError(f"TEST.EXPLAIN.TARGET={target!r}; expected one of {TARGETS}")
        if vis_per_class < 0:
            raise ValueError(f"TEST.EXPLAIN.VIS_PER_CLASS={vis_per_class} must be >= 0")
        if insertion_baseline not in INSERTION_BASELINES:
            raise ValueError(
                f"insertion_baseline={insertion_baseline!r}; expected one of {INSERTION_BASELINES}"
            )
        self._dataset_name = dataset_name
        self._class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
        self._model = model
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
        self.samples: List[ExplanationSample] = []
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
            method_class = SALIENCY_METHODS[name]
            applicable = []
            for level in levels:
                try:
                    method_class(model, [level])
                    applicable.append(level)
                except ValueError as e:
                    self._logger.warning(
                        f"[ExplanationEvaluator] skipping {name!r} on {level}: {e}"
                    )
            if applicable:
                explainers.append((name, method_class(model, applicable)))
        return explainers

    def reset(self):
        self._sums = np.zeros((len(self._keys), len(self._class_names), len(_SUMS)))
        self._samples: Dict[int, List[ExplanationSample]] = {}

    def process(self, inputs, outputs):
        labels = [self._label_of(x) for x in inputs]
        targets = labels if self._target == "gt" else None
        sampled = self._choose_samples(labels)
        new_samples = {}
        with torch.enable_grad():
            for name, method in self._explainers:
                scores = score_explanations(
                    self._model, inputs, method, targets, self._auc_steps, self._insertion_baseline
                )
                for i in sampled:
                    if i not in new_samples:
                        new_samples[i] = self._new_sample(inputs[i], int(scores.target_classes[i]))
                for level, level_scores in scores.levels.items():
                    self._add(self._keys.index((name, level)), labels, level_scores)
                    for i in sampled:
                        self._record(new_samples[i], (name, level), level_scores, i)
        for i, sample in new_samples.items():
            self._samples.setdefault(labels[i], []).append(sample)

    def _add(self, key_index, labels, level_scores):
        ones = np.ones(len(labels))
        values = [ones, level_scores.drop, level_scores.increase,
                  level_scores.deletion_auc, level_scores.insertion_auc]
        for column, value in enumerate(values):
            if value is not None:
                np.add.at(self._sums[key_index, :, column], labels, value)

    def _label_of(self, input_) -> int:
        if "label" not in input_:
            raise KeyError(
                f"ExplanationEvaluator on '{self._dataset_name}': dataset dict "
                f"{input_.get('file_name', '')!r} has no 'label'."
            )
        label = operator.index(input_["label"])
        if not 0 <= label < len(self._class_names):
            raise ValueError(
                f"ExplanationEvaluator on '{self._dataset_name}': 'label' is {label} in dataset "
                f"dict {input_.get('file_name', '')!r}, outside [0, {len(self._class_names)})."
            )
        return label

    def _choose_samples(self, labels) -> List[int]:
        """The first ``vis_per_class`` images of each class, in data order."""
        taken = {label: len(samples) for label, samples in self._samples.items()}
        chosen = []
        for i, label in enumerate(labels):
            if taken.get(label, 0) < self._vis_per_class:
                taken[label] = taken.get(label, 0) + 1
                chosen.append(i)
        return chosen

    def _new_sample(self, input_, target_class) -> ExplanationSample:
        image = _downscale(input_["image"].float()[None])[0]
        if not self._rgb:
            image = image.flip(0)
        return ExplanationSample(
            image_id=str(input_.get("image_id", input_.get("file_name", ""))),
            image=image.round().clamp(0, 255).byte().permute(1, 2, 0).numpy(),
            class_name=self._class_names[input_["label"]],
            target_name=self._class_names[target_class],
        )

    @staticmethod
    def _record(sample, key, level_scores, i):
        saliency = _downscale(level_scores.saliency[i].cpu()[None, None])[0, 0]
        sample.maps[key] = (saliency * 255).round().clamp(0, 255).byte().numpy()
        sample.drop[key] = float(level_scores.drop[i])
        sample.increase[key] = bool(level_scores.increase[i] > 0)

    def evaluate(self):
        if self._distributed:
            gathered = comm.all_gather((self._sums, self._samples))
            if not comm.is_main_process():
                return {}
            sums = np.sum([g[0] for g in gathered], axis=0)
            samples = {}
            for _, worker_samples in gathered:
                for label, label_samples in worker_samples.items():
                    samples.setdefault(label, []).extend(label_samples)
        else:
            sums, samples = self._sums, self._samples
        if sums[..., 0].sum() == 0:
            self._logger.warning(
                f"[ExplanationEvaluator] No images were explained on '{self._dataset_name}'."
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
                for metric in _METRICS:
                    if row[metric] is not None:
                        results[f"{row['method']}/{row['level']}/{metric}"] = row[metric]
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
                for column, metric in enumerate(_METRICS, start=1):
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
                "dataset": self._dataset_name,
                "target": self._target,
                "auc_steps": self._auc_steps,
                "insertion_baseline": self._insertion_baseline,
                "rows": self.rows,
            },
        )
        index_in_class = defaultdict(int)
        for sample in self.samples:
            index = index_in_class[sample.class_name]
            index_in_class[sample.class_name] += 1
            for (method, level), saliency in sample.maps.items():
                folder = os.path.join(self._output_dir, "heatmaps", method, level)
                os.makedirs(folder, exist_ok=True)
                overlay = overlay_heatmap(sample.image, saliency / 255.0)
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
                title=f"{method} on '{self._dataset_name}' (target: {self._target})",
            )


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
