#!/usr/bin/env python
"""Layer analysis of a trained classifier or detector: explanation quality per method and level.

This is the paper's Table 1: Average Drop % and Increase in Confidence % (Grad-CAM++), plus RISE
deletion/insertion AUC, for every explained level, over all classes and for one chosen class. AD
and IC reward maps that keep more of the image, so the table also gives each map's coverage, and
AD and IC with only its top k % of pixels kept (TEST.EXPLAIN.BUDGETS; the headline columns), and
Win %: how often a map's drop is smaller than that of the reference map (--win-reference, Grad-CAM
by default) at the same level, of the --compare model when one is given, on the same image.
Masked pixels become the mean colour (TEST.EXPLAIN.MASK "normalized", as pytorch-grad-cam and
TorchCAM) or black ("pixel").
Detectors (FALRCNN, FALRetinaNet, their plain-FPN versions) explain each image's top detection,
and their rows are per class of that detection; images without a detection are skipped and
counted (see fal_d2/explain/detection_targets.py for the rule).

    python tools/explain.py --config-file configs/fpn_baseline.yaml \\
        --weights output/fpn_baseline/model_final.pth --class-name airplane \\
        --output output/fpn_baseline/layer_analysis
    python tools/explain.py --config-file configs/fal_p2p3.yaml \\
        --weights output/fal/model_final.pth \\
        --compare-config configs/fpn_baseline.yaml --compare-weights output/fpn/model_final.pth \\
        --output output/fal_vs_fpn
    python tools/explain.py \\
        --config-file configs/COCO-Detection/fal_faster_rcnn_R_18_FPN_p2p3_shapes.yaml \\
        --weights output/shapes/model_final.pth --levels p2 p3 --max-images 20 \\
        --output output/shapes/layer_analysis

Writes to --output: ``layer_analysis.md``, ``.csv`` and ``.json`` (the table), ``grid_<method>.png``
(heatmaps, the two models side by side with --compare-config) and, in one subfolder per model, the
outputs of :class:`fal_d2.evaluation.ExplanationEvaluator` (``explanation_metrics.json`` with
every class, heatmap overlays, grids).
"""
import argparse
import csv
import io
import itertools
import logging
import os
import sys
from collections import defaultdict

import torch
from tabulate import tabulate
from tqdm import tqdm

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import fal_d2  # noqa: F401  (registers the model parts)
import fal_d2.data  # noqa: F401  (registers the UC Merced datasets)
from fal_d2.checkpoint import check_weights_given, load_weights
from fal_d2.config import add_fal_config, merge_config_file
from fal_d2.data import ClassificationDatasetMapper, build_batched_test_loader
from fal_d2.data.image_folder import register_from_config
from fal_d2.evaluation import ExplanationEvaluator
from fal_d2.evaluation.budgets import budget_suffix, check_budgets
from fal_d2.evaluation.explanation_evaluator import check_explain_config
from fal_d2.explain import SALIENCY_METHODS
from fal_d2.explain.faithfulness import MASK_CONVENTIONS
from fal_d2.explain.metrics import win_rate
from fal_d2.explain.visualize import explanation_grid, save_grid_figure
from fal_d2.utils.atomic_io import atomic_write_json, atomic_write_text

logger = logging.getLogger("fal_d2.tools.explain")

def table_columns(budgets):
    """(row key, Markdown/CSV column title, number format) of the table, budgets first."""
    columns = [("model", "model", "s"), ("method", "method", "s"), ("level", "level", "s"),
               ("class", "class", "s")]
    for percent in budgets:
        suffix = budget_suffix(percent)
        columns += [(f"average_drop{suffix}", f"AD % top {percent:g} % ↓", ".2f"),
                    (f"increase_in_confidence{suffix}", f"IC % top {percent:g} % ↑", ".2f"),
                    (f"win{suffix}", f"Win % top {percent:g} % ↑", ".1f")]
    return columns + [
        ("average_drop", "AD % whole map ↓", ".2f"),
        ("increase_in_confidence", "IC % whole map ↑", ".2f"),
        ("win", "Win % whole map ↑", ".1f"),
        ("coverage", "coverage", ".3f"),
        ("deletion_auc", "Deletion AUC ↓", ".4f"),
        ("insertion_auc", "Insertion AUC ↑", ".4f"),
        ("num_images", "images", "d"),
    ]


def add_win_rates(rows, evaluators, reference_label, reference_method, budgets):
    """
    Add Win % columns to the "all" rows: the percentage of images where the row's Average Drop is
    strictly smaller than that of ``reference_method`` of the model ``reference_label`` at the
    same level (Grad-CAM++'s Win %), at each budget and for the whole map. Rows with no reference
    at their level, and the reference's own rows, get None.
    """
    reference = evaluators[reference_label].per_image_drops
    metrics = [("win", "average_drop")] + [
        (f"win{budget_suffix(p)}", f"average_drop{budget_suffix(p)}") for p in budgets]
    for row in rows:
        for win_key, drop_key in metrics:
            row[win_key] = None
            if row["class"] != "all" or (row["model"], row["method"]) == (reference_label,
                                                                          reference_method):
                continue
            ours = evaluators[row["model"]].per_image_drops.get(
                f"{row['method']}/{row['level']}/{drop_key}", {})
            theirs = reference.get(f"{reference_method}/{row['level']}/{drop_key}", {})
            shared = sorted(set(ours) & set(theirs))
            if shared:
                row[win_key] = win_rate([ours[i] for i in shared], [theirs[i] for i in shared])


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", help="checkpoint of the model (default: MODEL.WEIGHTS)")
    parser.add_argument("--dataset", help="registered dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--class-name", help="one class reported beside all classes, e.g. airplane "
                                             "(for a detector: the class of the top detection)")
    parser.add_argument("--methods", nargs="+", choices=sorted(SALIENCY_METHODS),
                        help="saliency methods (default: TEST.EXPLAIN.METHODS)")
    parser.add_argument("--levels", nargs="+",
                        help="levels to explain (default: TEST.EXPLAIN.LEVELS)")
    parser.add_argument("--target", choices=["pred", "gt"],
                        help="class explained (default: TEST.EXPLAIN.TARGET); detectors: pred")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--max-images", type=int,
                        help="explain at most N images, taken in turn from each class "
                             "(detection sets: the first N)")
    parser.add_argument("--vis-per-class", type=int,
                        help="images per class in the heatmap grids "
                             "(default: TEST.EXPLAIN.VIS_PER_CLASS)")
    parser.add_argument("--auc-steps", type=int,
                        help="steps of the deletion/insertion curves; 0 skips them "
                             "(default: TEST.EXPLAIN.AUC_STEPS)")
    parser.add_argument("--mask", choices=MASK_CONVENTIONS,
                        help="what masked pixels become: the mean colour ('normalized', as "
                             "pytorch-grad-cam and TorchCAM) or black ('pixel') "
                             "(default: TEST.EXPLAIN.MASK)")
    parser.add_argument("--budgets", type=float, nargs="+", metavar="K",
                        help="also score each map with only its top K %% of pixels "
                             "(default: TEST.EXPLAIN.BUDGETS)")
    parser.add_argument("--win-reference", default="gradcam", metavar="METHOD",
                        help="Win %% compares every map's drop with this method's at the same "
                             "level, of the --compare model if given (default: gradcam)")
    parser.add_argument("--compare-config", metavar="FILE",
                        help="a second model, shown side by side")
    parser.add_argument("--compare-weights", help="checkpoint of the second model")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="explain a model without weights (randomly initialised) instead "
                             "of failing")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides (KEY VALUE ...), applied to both models")
    return parser


def setup_cfg(config_file, weights, args):
    cfg = get_cfg()
    add_fal_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(args.opts)
    register_from_config(cfg)
    if weights:
        cfg.MODEL.WEIGHTS = weights
    for key, value in [("METHODS", args.methods), ("LEVELS", args.levels), ("TARGET", args.target),
                       ("VIS_PER_CLASS", args.vis_per_class), ("AUC_STEPS", args.auc_steps),
                       ("MASK", args.mask), ("BUDGETS", args.budgets)]:
        if value is not None:
            cfg.TEST.EXPLAIN[key] = value
    check_explain_config(cfg)
    check_weights_given(cfg.MODEL.WEIGHTS, args.allow_random_weights, weights_label(config_file),
                        "pass --allow-random-weights")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def weights_label(config_file):
    return f"{config_file} (--weights/--compare-weights)"


def load_model(cfg, config_file, allow_random_weights=False):
    """The model with its weights, checked (fal_d2.checkpoint): no weights fails unless
    --allow-random-weights, a file that does not fit unless MODEL.WEIGHTS_PARTIAL."""
    model = build_model(cfg)
    load_weights(model, cfg, allow_random_weights=allow_random_weights,
                 what=weights_label(config_file), opt_in="pass --allow-random-weights")
    return model.eval()


def select_images(dataset_dicts, max_images):
    """
    At most ``max_images`` dicts, taken in turn from each class so that all classes appear;
    without image-level labels (detection sets), the first ``max_images``.
    """
    if max_images is None or max_images >= len(dataset_dicts):
        return list(dataset_dicts)
    if max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {max_images}")
    if not all("label" in record for record in dataset_dicts):
        return list(dataset_dicts[:max_images])
    by_class = defaultdict(list)
    for record in dataset_dicts:
        by_class[record["label"]].append(record)
    in_turn = (
        record
        for group in itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
        for record in group
        if record is not None
    )
    return list(itertools.islice(in_turn, max_images))


def explain_model(cfg, model, dataset_name, dataset_dicts, output_dir, label):
    """Run an ExplanationEvaluator over the images; returns it, evaluated."""
    evaluator = ExplanationEvaluator.from_config(
        cfg, dataset_name, model, output_dir=output_dir, distributed=False
    )
    if evaluator.task == "detection":
        mapper = DatasetMapper(cfg, is_train=False)
    else:
        mapper = ClassificationDatasetMapper(cfg, is_train=False)
    loader = build_batched_test_loader(
        dataset_dicts, mapper=mapper, batch_size=cfg.TEST.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    evaluator.reset()
    with tqdm(total=len(dataset_dicts), desc=f"explaining {label}", unit="img") as progress:
        for inputs in loader:
            evaluator.process(inputs, None)
            progress.update(len(inputs))
    evaluator.evaluate()
    return evaluator


def write_table(rows, output_dir, dataset_name, class_name, skipped=None, protocol=None):
    """
    The table as Markdown, CSV and JSON (atomically). ``skipped`` maps each detector's label to
    its number of images without a detection; ``protocol`` holds the mask convention, budgets and
    Win % reference the rows were measured with.
    """
    protocol = protocol or {"mask": None, "budgets": [], "win_reference": None}
    columns = table_columns(protocol["budgets"])
    keys = [key for key, _, _ in columns]
    titles = [title for _, title, _ in columns]

    def formatted(row):
        return ["" if row.get(key) is None else format(row[key], spec)
                for key, _, spec in columns]

    title = f"Explanation quality on '{dataset_name}'"
    if class_name:
        title += f" (class {class_name!r} and all classes)"
    markdown = f"# {title}\n\n"
    if protocol["mask"]:
        markdown += (f"Mask convention: {protocol['mask']}; budgets: top "
                     f"{', '.join(f'{p:g}' for p in protocol['budgets']) or '–'} % of each map's "
                     f"pixels; Win % against {protocol['win_reference']}.\n\n")
    markdown += tabulate([formatted(row) for row in rows], headers=titles,
                         tablefmt="github", disable_numparse=True) + "\n"
    if skipped:
        markdown += "\nDetectors explain each image's top detection; images without one: " + \
            ", ".join(f"{label} {count}" for label, count in skipped.items()) + "\n"
    atomic_write_text(os.path.join(output_dir, "layer_analysis.md"), markdown)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(keys)
    writer.writerows([["" if row.get(key) is None else row[key] for key in keys] for row in rows])
    atomic_write_text(os.path.join(output_dir, "layer_analysis.csv"), buffer.getvalue())
    atomic_write_json(os.path.join(output_dir, "layer_analysis.json"),
                      {"dataset": dataset_name, "class_name": class_name, **protocol,
                       "num_images_skipped": skipped or {}, "rows": rows})
    return markdown


def write_grids(models, output_dir, dataset_name):
    """One grid per method: the input, then each model's heatmaps of that method."""
    methods = dict.fromkeys(method for _, evaluator in models for method in evaluator.method_levels)
    paths = []
    for method in methods:
        having = [(label, e) for label, e in models if method in e.method_levels and e.samples]
        if not having:
            continue
        rows, columns, row_labels = explanation_grid(
            [(label, e.samples) for label, e in having], method,
            [e.method_levels[method] for _, e in having],
        )
        path = os.path.join(output_dir, f"grid_{method}.png")
        save_grid_figure(rows, columns, path, row_labels=row_labels,
                         title=f"{method} on '{dataset_name}': "
                         + " vs ".join(label for label, _ in having))
        paths.append(path)
    return paths


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fal_d2")
    if args.compare_weights and not args.compare_config:
        raise ValueError("--compare-weights needs --compare-config")
    configs = [(args.config_file, args.weights)]
    if args.compare_config:
        configs.append((args.compare_config, args.compare_weights))
    cfgs = [setup_cfg(config_file, weights, args) for config_file, weights in configs]
    for key in ("MASK", "BUDGETS"):
        if len({str(cfg.TEST.EXPLAIN[key]) for cfg in cfgs}) > 1:
            raise ValueError(f"TEST.EXPLAIN.{key} differs between the two configs; the models "
                             f"must be compared under one protocol (set --{key.lower()})")

    dataset_name = args.dataset or cfgs[0].DATASETS.TEST[0]
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(f"--dataset: {dataset_name!r} is not a registered dataset")
    class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
    if args.class_name is not None and args.class_name not in class_names:
        raise ValueError(
            f"--class-name {args.class_name!r} is not a class of '{dataset_name}': {class_names}"
        )
    dataset_dicts = select_images(DatasetCatalog.get(dataset_name), args.max_images)
    os.makedirs(args.output, exist_ok=True)

    models, rows, skipped = [], [], {}
    for (config_file, _), cfg in zip(configs, cfgs):
        label = os.path.splitext(os.path.basename(config_file))[0]
        if any(label == other for other, _ in models):
            label += "_compare"
        model = load_model(cfg, config_file, args.allow_random_weights)
        evaluator = explain_model(cfg, model, dataset_name, dataset_dicts,
                                  os.path.join(args.output, label), label)
        models.append((label, evaluator))
        rows += [dict(model=label, **row) for row in evaluator.rows
                 if row["class"] in ("all", args.class_name)]
        if evaluator.task == "detection":
            skipped[label] = evaluator.num_images_skipped

    reference_label = models[-1][0]  # the --compare model if there is one, else the model
    budgets = check_budgets(cfgs[0].TEST.EXPLAIN.BUDGETS)
    add_win_rates(rows, dict(models), reference_label, args.win_reference, budgets)
    protocol = {"mask": cfgs[0].TEST.EXPLAIN.MASK, "budgets": budgets,
                "win_reference": f"{args.win_reference} of {reference_label}"}
    print(write_table(rows, args.output, dataset_name, args.class_name, skipped, protocol))
    paths = write_grids(models, args.output, dataset_name)
    print("Outputs:\n" + "\n".join(
        f"  {os.path.join(args.output, name)}"
        for name in ["layer_analysis.md", "layer_analysis.csv", "layer_analysis.json"]
        + [os.path.relpath(p, args.output) for p in paths] + [label for label, _ in models]
    ))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (KeyError, ValueError, FileNotFoundError) as e:
        sys.exit(f"tools/explain.py: error: {e.args[0] if e.args else e}")
