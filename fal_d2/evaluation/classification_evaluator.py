"""Image-classification accuracy (top-1, top-5, per-class) as a Detectron2 DatasetEvaluator."""
import logging
import math
import operator
import os
from collections import OrderedDict
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from fal_d2.evaluation.labels import checked_label
from fal_d2.utils.atomic_io import atomic_save_figure, atomic_write_json

__all__ = ["ClassificationEvaluator"]


class ClassificationEvaluator(DatasetEvaluator):
    """
    Top-1, top-5, mean per-class and per-class accuracy, in percent.

    The only state is a K x K confusion-count matrix and a top-k hit count, so memory stays
    constant for any dataset size and the cross-worker gather is a few kilobytes; every metric
    is a ratio of sums of these counts, so summing the counts over workers is exact.

    Inputs are dataset dicts with an int ``label`` in [0, K); outputs are dicts with ``scores``
    (1-D tensor of K class probabilities) and ``pred_class`` (int). Top-1 counts ``pred_class``;
    top-5 counts ``label`` among the 5 highest ``scores`` (top-K when K < 5, keeping the key
    "top5" so that dashboards stay comparable).
    """

    def __init__(self, dataset_name, output_dir=None, distributed=True):
        """
        Args:
            dataset_name (str): a registered dataset whose metadata has ``thing_classes``.
            output_dir (str or None): where ``confusion_matrix.json`` and ``.png`` are written.
            distributed (bool): if True, sum the counts of all workers and return the results on
                the main process only; if False, each process evaluates what it has seen.
        """
        self._dataset_name = dataset_name
        self._class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
        self._output_dir = output_dir
        self._distributed = distributed
        self._topk = min(5, len(self._class_names))
        self._logger = logging.getLogger(__name__)
        self.reset()

    def reset(self):
        num_classes = len(self._class_names)
        self._confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._topk_hits = 0

    def process(self, inputs, outputs):
        for input_, output in zip(inputs, outputs):
            label = self._label_of(input_)
            pred_class = self._pred_class_of(output)
            scores = output["scores"]
            if scores.shape != (len(self._class_names),):
                raise ValueError(
                    f"ClassificationEvaluator on '{self._dataset_name}': output 'scores' has shape "
                    f"{tuple(scores.shape)}, expected ({len(self._class_names)},)."
                )
            self._confusion[label, pred_class] += 1
            self._topk_hits += int(label in scores.topk(self._topk).indices.tolist())

    def evaluate(self):
        if self._distributed:
            partial_counts = comm.all_gather((self._confusion, self._topk_hits))
            if not comm.is_main_process():
                return {}
            confusion = np.sum([counts[0] for counts in partial_counts], axis=0)
            topk_hits = sum(counts[1] for counts in partial_counts)
        else:
            confusion, topk_hits = self._confusion, self._topk_hits

        num_images = int(confusion.sum())
        if num_images == 0:
            self._logger.warning(
                f"[ClassificationEvaluator] No images were processed on '{self._dataset_name}'."
            )
            return {}
        metrics = self._metrics(confusion, topk_hits)
        self._logger.info(
            f"Classification on '{self._dataset_name}' ({num_images} images): "
            f"top1 {metrics['top1']:.2f}, top5 {metrics['top5']:.2f}, "
            f"mean_class_acc {metrics['mean_class_acc']:.2f}"
        )
        if self._output_dir and comm.is_main_process():
            self._write_confusion_matrix(confusion, metrics)
        return OrderedDict({"classification": metrics})

    def _label_of(self, input_) -> int:
        return checked_label(input_, self._class_names, "ClassificationEvaluator", self._dataset_name)

    def _pred_class_of(self, output):
        # Checked because numpy would silently wrap a negative index into another cell.
        pred_class = operator.index(output["pred_class"])
        if not 0 <= pred_class < len(self._class_names):
            raise ValueError(
                f"ClassificationEvaluator on '{self._dataset_name}': output 'pred_class' is "
                f"{pred_class}, outside [0, {len(self._class_names)})."
            )
        return pred_class

    def _metrics(self, confusion, topk_hits):
        """
        Percentages from summed counts. A class without ground-truth images has accuracy NaN
        (Detectron2's SemSegEvaluator convention) and is left out of mean_class_acc.
        """
        num_images = int(confusion.sum())
        images_per_class = confusion.sum(axis=1)
        correct_per_class = np.diag(confusion)
        with np.errstate(invalid="ignore", divide="ignore"):
            class_acc = 100.0 * correct_per_class / images_per_class
        metrics = OrderedDict()
        metrics["top1"] = 100.0 * int(correct_per_class.sum()) / num_images
        metrics["top5"] = 100.0 * topk_hits / num_images
        metrics["mean_class_acc"] = float(np.nanmean(class_acc))
        for name, acc in zip(self._class_names, class_acc):
            metrics[f"acc/{name}"] = float(acc)
        return metrics

    def _write_confusion_matrix(self, confusion, metrics):
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_write_json(
            os.path.join(self._output_dir, "confusion_matrix.json"),
            {
                "dataset": self._dataset_name,
                "class_names": self._class_names,
                "rows": "ground truth",
                "cols": "prediction",
                "confusion_matrix": confusion.tolist(),
                "top5_k": self._topk,
                # strict JSON has no NaN: a class without images is written as null
                "metrics": {k: None if math.isnan(v) else v for k, v in metrics.items()},
            },
        )
        title = f"{self._dataset_name}: top-1 {metrics['top1']:.2f}% ({confusion.sum()} images)"
        figure = _plot_confusion_matrix(confusion, self._class_names, title)
        atomic_save_figure(figure, os.path.join(self._output_dir, "confusion_matrix.png"), dpi=100)


def _plot_confusion_matrix(confusion, class_names, title):
    """
    A labelled confusion-matrix figure: counts in the cells, colours normalised per ground-truth
    row so that small and large classes read alike. Built on a bare Agg canvas, not pyplot, so
    it touches no global backend or figure registry.
    """
    num_classes = len(class_names)
    images_per_class = confusion.sum(axis=1, keepdims=True)
    row_fraction = confusion / np.maximum(images_per_class, 1)

    side = max(4.0, 0.45 * num_classes + 2.5)
    figure = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(row_fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of ground-truth row")

    font_size = 9 if num_classes <= 10 else 7
    for row in range(num_classes):
        for col in range(num_classes):
            ax.text(
                col,
                row,
                str(confusion[row, col]),
                ha="center",
                va="center",
                fontsize=font_size,
                color="white" if row_fraction[row, col] > 0.5 else "black",
            )
    ax.set_xticks(range(num_classes), labels=class_names, rotation=90)
    ax.set_yticks(range(num_classes), labels=class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    figure.tight_layout()
    return figure
