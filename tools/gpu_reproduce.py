#!/usr/bin/env python
"""The paper's experiment on a GPU in one call: cost, loader speed, training runs, layer analysis.

    python tools/gpu_reproduce.py --output $OUT/gpu                          # everything
    python tools/gpu_reproduce.py --output $OUT/gpu --stages cost            # cost and loader only
    python tools/gpu_reproduce.py --runs fpn_baseline_s0 fal_p2p3_s0 --output $OUT/gpu \\
        --stages train analysis

(On the lent GPU machines, which have no package registry, tools/gpu_reproduce.sh installs the
carried dependencies and the data first, then calls this.)

Stages:
  cost      params, FLOPs, synthetic training/inference img/s and explanation ms/img
            (tools/benchmark.py under fp16 AMP), and the train loader alone, in img/s;
  train     each run of --runs: tools/train_net.py from scratch with SOLVER.AMP, evaluated once at
            the end (top-1, top-5, mean per-class accuracy, AD/IC per method and level); an
            explanation head run (*_head_s*) is the second stage of its base run, trained
            after it from its model_final.pth;
  analysis  tools/explain.py's layer analysis of the first FPN baseline run, tools/select_levels.py
            on it, then, for every seed with the runs, FAL (fal_p2p3) against the FPN baseline
            of the same seed: Grad-CAM, the attention map M, the branch class map and the random
            control at p2 and p3, in both mask conventions, with budgets, coverage, Win % and
            deletion/insertion AUC (explanations.json and explanations.md: means over the seeds),
            and heatmap grids.

Every stage writes JSON under --output. Re-running with the same --output skips finished runs,
and a run that was cut off resumes from its last checkpoint. --deadline-s stops starting runs
that the remaining time could not finish (estimated from the runs already made), so a call under
a hard time limit still ends with its summary written. summary.json collects everything, runs.md
holds the runs as a Markdown table, and a short table is printed.

Config overrides (--opts, or KEY VALUE pairs at the end of the line) apply to every run and
analysis. With MODEL.DEVICE cpu among them the same experiment runs on a CPU, without AMP; with
overrides of the schedule, at a reduced one (docs/RESULTS.md gives the command used for the CPU
ablations).
"""
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch
from tabulate import tabulate

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS_DIR)
sys.path.insert(0, REPO_ROOT)

from fal_d2.evaluation.budgets import (  # noqa: E402
    budget_suffix,
    describe_budgets,
    table_budget_mode,
)
from fal_d2.evaluation.seed_means import format_mean  # noqa: E402
from fal_d2.utils.atomic_io import atomic_write_json, atomic_write_text  # noqa: E402
from fal_d2.utils.tool_args import ToolArgumentParser, override_value  # noqa: E402

# (config, seed) of each run, in the order they are made: the pairs the comparison needs first.
RUNS = {
    "fpn_baseline_s0": ("configs/fpn_baseline.yaml", 0),
    "fal_p2p3_s0": ("configs/fal_p2p3.yaml", 0),
    "fpn_baseline_s1": ("configs/fpn_baseline.yaml", 1),
    "fal_p2p3_s1": ("configs/fal_p2p3.yaml", 1),
    "fpn_baseline_mix_s0": ("configs/fpn_baseline_mix.yaml", 0),
    "fal_p2p3_mix_s0": ("configs/fal_p2p3_mix.yaml", 0),
    "fpn_baseline_mix_s1": ("configs/fpn_baseline_mix.yaml", 1),
    "fal_p2p3_mix_s1": ("configs/fal_p2p3_mix.yaml", 1),
    "fpn_baseline_head_s0": ("configs/explain_head/fpn_baseline_head.yaml", 0),
    "fal_p2p3_head_s0": ("configs/explain_head/fal_p2p3_head.yaml", 0),
    "fpn_baseline_head_s1": ("configs/explain_head/fpn_baseline_head.yaml", 1),
    "fal_p2p3_head_s1": ("configs/explain_head/fal_p2p3_head.yaml", 1),
    "fal_p2_s0": ("configs/fal_p2.yaml", 0),
    "fal_p3_s0": ("configs/fal_p3.yaml", 0),
    "fal_p4_s0": ("configs/fal_p4.yaml", 0),
    "fal_p5_s0": ("configs/fal_p5.yaml", 0),
    "fal_all_s0": ("configs/fal_all.yaml", 0),
    "abn_r50_s0": ("configs/abn_r50.yaml", 0),
}
# Second stages (MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD): the run whose model_final.pth each trains on.
BASE_RUNS = {f"{model}_head_s{seed}": f"{model}_s{seed}"
             for model in ("fpn_baseline", "fal_p2p3") for seed in (0, 1)}
STAGES = ("cost", "train", "analysis")
DEVICES = ("cuda", "cpu")  # the first is the default
ANALYSED_RUNS = ("fpn_baseline_s0", "fal_p2p3_s0")  # the analysis needs these two first
# The explanation comparison: each model against the reference (its Grad-CAM is Win %'s
# reference), seed by seed, at these levels, in both mask conventions.
COMPARED = ("fal_p2p3",)
REFERENCE = "fpn_baseline"
COMPARED_LEVELS = ["p2", "p3"]
COMPARED_METHODS = ["gradcam", "attention", "branch_cam", "random"]  # random: the control
MASKS = ("normalized", "pixel")
BENCHMARK_CONFIGS = ["configs/fpn_baseline.yaml", "configs/fal_p2p3.yaml", "configs/fal_all.yaml",
                     "configs/explain_head/fal_p2p3_head.yaml"]
EXPLAIN_METHODS = ["branch_cam", "attention", "gradcam", "gradcampp", "head"]


def environment():
    import detectron2

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "detectron2": detectron2.__version__,
    }


def layout_opts(args):
    """NHWC on the GPU, for the benchmark and the runs alike (so the cost is that of the runs)."""
    return ["MODEL.CHANNELS_LAST", str(args.device == "cuda")]


def common_opts(args):
    """Overrides shared by every training run and analysis: GPU speed settings, final-only eval."""
    opts = layout_opts(args) + [
        "SOLVER.AMP.ENABLED", "True",
        "DATALOADER.NUM_WORKERS", str(args.workers),
        "TEST.IMS_PER_BATCH", str(args.test_batch),
        "TEST.EXPLAIN.AUC_STEPS", "0",
    ]
    if args.device == "cpu":
        opts += ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False"]
    return opts + list(args.opts)


def run_logged(command, log_path):
    """Run ``command`` with its output appended to ``log_path``; raise naming the log if it fails."""
    with open(log_path, "a") as log:
        completed = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} failed (exit {completed.returncode}); "
                           f"log {log_path}:\n{tail}")


# ---------------------------------------------------------------- cost


def measure_loader(config_file, opts, batches, warmup):
    """The training loader alone, in img/s: after ``warmup`` batches (first decodes) and cold."""
    from detectron2.config import get_cfg

    from fal_d2.config import add_fal_config
    from fal_d2.data import build_classification_train_loader

    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, config_file))
    cfg.merge_from_list(opts)
    loader = iter(build_classification_train_loader(cfg))
    start = time.perf_counter()
    for _ in range(warmup):
        next(loader)
    warm = time.perf_counter()
    for _ in range(batches):
        next(loader)
    end = time.perf_counter()
    batch_size = cfg.SOLVER.IMS_PER_BATCH
    return {
        "workers": cfg.DATALOADER.NUM_WORKERS,
        "cache_images": cfg.DATALOADER.CACHE_IMAGES,
        "batch_size": batch_size,
        "cold_img_s": batch_size * warmup / (warm - start),
        "warm_img_s": batch_size * batches / (end - warm),
    }


def stage_cost(args, output_dir):
    sys.path.insert(0, TOOLS_DIR)
    import benchmark

    path = os.path.join(output_dir, "benchmark_gpu.json")
    benchmark.main(["--config-file", *BENCHMARK_CONFIGS, "--amp",
                    "--batch-size", str(args.batch_size), "--iters", str(args.bench_iters),
                    "--warmup", "3", "--output", path,
                    "--opts", "MODEL.DEVICE", args.device, *layout_opts(args), *args.opts])
    loader = [
        measure_loader("configs/fal_p2p3.yaml", ["DATALOADER.NUM_WORKERS", str(workers), *args.opts],
                       args.loader_batches, args.loader_warmup)
        for workers in args.loader_workers
    ]
    print(tabulate(loader, headers="keys", floatfmt=".0f"))
    atomic_write_json(os.path.join(output_dir, "loader.json"), loader)


# ---------------------------------------------------------------- train


def last_line_with(metrics_path, key):
    found = None
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if key in record:
                found = record
    return found


def training_img_s(run_dir, batch_size):
    """
    End-to-end training img/s from Detectron2's "Overall training speed" log line: wall time per
    iteration, data loading and hooks included. (metrics.json holds window medians, which hide the
    occasional long wait for data.)
    """
    seconds_per_iter = None
    with open(os.path.join(run_dir, "log.txt")) as f:
        for line in f:
            match = re.search(r"Overall training speed: .* \(([0-9.]+) s / it\)", line)
            if match:
                seconds_per_iter = float(match.group(1))
    return batch_size / seconds_per_iter if seconds_per_iter else None


def training_starts(run_dir):
    """The iteration each training session of the run started from (Detectron2 appends to
    log.txt). More than one means the run was cut off and resumed: its wall time and speed then
    cover only the last session."""
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [int(match.group(1)) for match in
                re.finditer(r"Starting training from iteration (\d+)", f.read())]


def summarize_run(run_dir, config_file, seed, wall_s):
    from detectron2.config import get_cfg

    from fal_d2.config import add_fal_config

    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(os.path.join(run_dir, "config.yaml"))
    metrics_path = os.path.join(run_dir, "metrics.json")
    final = last_line_with(metrics_path, "classification/top1") or {}
    explain_path = os.path.join(run_dir, "explain", cfg.DATASETS.TEST[0], "explanation_metrics.json")
    rows = []
    if os.path.isfile(explain_path):
        with open(explain_path) as f:
            rows = [row for row in json.load(f)["rows"] if row["class"] in ("all", "airplane")]
    return {
        "config": config_file,
        "seed": seed,
        "attention_levels": list(cfg.MODEL.FAL.ATTENTION_LEVELS),
        "max_iter": cfg.SOLVER.MAX_ITER,
        "batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "wall_s": wall_s,  # of the last call: the whole run only if it was not resumed
        "started_at_iterations": training_starts(run_dir),
        "train_img_s": training_img_s(run_dir, cfg.SOLVER.IMS_PER_BATCH),
        "top1": final.get("classification/top1"),
        "top5": final.get("classification/top5"),
        "mean_class_acc": final.get("classification/mean_class_acc"),
        "explanation_rows": rows,
    }


def stage_train(args, output_dir, deadline, runs):
    for name in runs:
        config_file, seed = RUNS[name]
        run_dir = os.path.join(output_dir, "runs", name)
        summary_path = os.path.join(run_dir, "run_summary.json")
        if os.path.isfile(summary_path):
            print(f"{name}: already done, skipped")
            continue
        base_weights = []
        if name in BASE_RUNS:
            base = os.path.join(output_dir, "runs", BASE_RUNS[name], "model_final.pth")
            if not os.path.isfile(base):
                print(f"{name}: not started, its base run {BASE_RUNS[name]} is not trained")
                continue
            base_weights = ["MODEL.WEIGHTS", base]
        if not deadline.allows(name):
            print(f"{name}: not started, the deadline would cut it off")
            continue
        os.makedirs(run_dir, exist_ok=True)
        # --resume continues from the run's last checkpoint (SOLVER.CHECKPOINT_PERIOD) if a
        # previous call was cut off mid-run, and starts from scratch otherwise.
        command = [sys.executable, os.path.join(TOOLS_DIR, "train_net.py"), "--config-file", config_file,
                   "--resume", "OUTPUT_DIR", run_dir, "SEED", str(seed), "TEST.EVAL_PERIOD", "0",
                   "TEST.EXPLAIN.ENABLED", "True",
                   "TEST.EXPLAIN.METHODS", str(EXPLAIN_METHODS),
                   "TEST.EXPLAIN.VIS_PER_CLASS", str(args.vis_per_class),
                   *base_weights, *common_opts(args)]
        if args.max_iter:
            command += ["SOLVER.MAX_ITER", str(args.max_iter)]
        start = time.perf_counter()
        run_logged(command, os.path.join(run_dir, "train_log.txt"))
        wall_s = time.perf_counter() - start
        deadline.record(wall_s)
        summary = summarize_run(run_dir, config_file, seed, wall_s)
        atomic_write_json(summary_path, summary)
        print(f"{name}: top1 {summary['top1']}, {summary['train_img_s'] or 0:.0f} img/s, "
              f"{wall_s:.0f} s", flush=True)


# ---------------------------------------------------------------- analysis


def stage_analysis(args, output_dir):
    """Layer analysis of the seed-0 baseline and level selection, then the explanation comparison
    (see the module docstring) for every seed whose runs are trained; ``--analyses`` picks the
    parts. Each finished table is kept, so a re-run does only what is missing."""
    runs_dir = os.path.join(output_dir, "runs")
    analysis_dir = os.path.join(output_dir, "analysis")
    baseline = os.path.join(runs_dir, "fpn_baseline_s0", "model_final.pth")
    if not os.path.isfile(baseline):
        print("analysis: needs fpn_baseline_s0 trained in this --output; skipped")
        return
    os.makedirs(analysis_dir, exist_ok=True)
    explain = [sys.executable, os.path.join(TOOLS_DIR, "explain.py"), "--class-name", "airplane",
               "--vis-per-class", str(args.vis_per_class)]
    if args.explain_images:
        explain += ["--max-images", str(args.explain_images)]

    def auc_steps(mask):
        return ["--auc-steps", str(args.auc_steps if mask in args.auc_masks else 0)]

    layer_dir = os.path.join(analysis_dir, "layer_analysis")
    if "layers" in args.analyses and not os.path.isfile(
            os.path.join(layer_dir, "layer_analysis.json")):
        run_logged(explain + auc_steps("normalized") + [
                       "--config-file", RUNS["fpn_baseline_s0"][0],
                       "--methods", "gradcam", "gradcampp", "random", "--output", layer_dir,
                       "--opts", *common_opts(args), "MODEL.WEIGHTS", baseline],
                   os.path.join(analysis_dir, "layer_analysis_log.txt"))
        metrics = [os.path.join(root, name) for root, _, names in os.walk(layer_dir)
                   for name in names if name == "explanation_metrics.json"]
        run_logged([sys.executable, os.path.join(TOOLS_DIR, "select_levels.py"), metrics[0],
                    "--output", os.path.join(analysis_dir, "fal_selected.yaml")],
                   os.path.join(analysis_dir, "select_levels_log.txt"))
    for seed in (0, 1) if "comparison" in args.analyses else ():
        reference = f"{REFERENCE}_s{seed}"
        for model in COMPARED:
            name = f"{model}_s{seed}"
            weights = [os.path.join(runs_dir, run, "model_final.pth") for run in (name, reference)]
            if not all(os.path.isfile(path) for path in weights):
                continue
            for mask in MASKS:
                out = os.path.join(analysis_dir, "comparison", f"{name}_vs_{reference}", mask)
                if os.path.isfile(os.path.join(out, "layer_analysis.json")):
                    continue
                run_logged(explain + auc_steps(mask) + [
                               "--config-file", RUNS[name][0],
                               "--compare-config", RUNS[reference][0],
                               "--compare-weights", weights[1],
                               "--methods", *COMPARED_METHODS, "--levels", *COMPARED_LEVELS,
                               "--mask", mask, "--output", out,
                               "--opts", *common_opts(args), "MODEL.WEIGHTS", weights[0]],
                           os.path.join(analysis_dir, "comparison_log.txt"))
    summarize_comparison(analysis_dir)
    shrink_grids(analysis_dir)


def summarize_comparison(analysis_dir):
    """
    ``explanations.json``: every "all"-class row of the comparison, per seed and mask, with the
    models' top-1; ``explanations.md``: their means over the seeds (± half the range with two).
    The reference model's rows come from each comparison it appears in (the same model and
    images, so the same numbers), taken once per seed.
    """
    root = os.path.join(analysis_dir, "comparison")
    if not os.path.isdir(root):
        return None
    records = []
    for pair in sorted(os.listdir(root)):
        seed = int(re.search(r"_s(\d+)_vs_", pair).group(1))
        for mask in MASKS:
            path = os.path.join(root, pair, mask, "layer_analysis.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                table = json.load(f)
            for row in table["rows"]:
                if row["class"] != "all":
                    continue
                model = row["model"].replace("_compare", "")
                key = (model, row["method"], row["level"], mask, seed)
                if any(r["key"] == key for r in records):
                    continue  # the reference, already taken from another comparison
                records.append({"key": key, "model": model, "seed": seed, "mask": mask,
                                "budgets": table["budgets"],
                                "budget_mode": table_budget_mode(table),
                                **{k: v for k, v in row.items() if k not in ("model", "class")}})
    for record in records:
        del record["key"]
    atomic_write_json(os.path.join(analysis_dir, "explanations.json"), records)
    atomic_write_text(os.path.join(analysis_dir, "explanations.md"), comparison_markdown(records))
    return records


def comparison_markdown(records):
    """Means over seeds of the comparison rows, one table per mask convention."""
    budgets = records[0]["budgets"] if records else []
    columns = []
    for percent in budgets:
        suffix = budget_suffix(percent)
        columns += [(f"average_drop{suffix}", f"AD {percent:g} %"),
                    (f"increase_in_confidence{suffix}", f"IC {percent:g} %"),
                    (f"win{suffix}", f"Win {percent:g} %")]
    columns += [("average_drop", "AD"), ("increase_in_confidence", "IC"), ("win", "Win"),
                ("coverage", "coverage"), ("deletion_auc", "Del AUC"),
                ("insertion_auc", "Ins AUC")]
    lines = []
    for mask in MASKS:
        rows = [r for r in records if r["mask"] == mask]
        if not rows:
            continue
        lines += [f"### Mask convention: {mask}", "",
                  f"Budgets: {describe_budgets(budgets, table_budget_mode(rows[0]))}.", "",
                  "| model | method | level | seeds | " + " | ".join(t for _, t in columns) + " |",
                  "|" + " --- |" * (4 + len(columns))]
        groups = {}
        for r in rows:
            groups.setdefault((r["model"], r["method"], r["level"]), []).append(r)
        for (model, method, level), group in groups.items():
            cells = [format_mean([r.get(key) for r in group], 3 if key in ("coverage", "deletion_auc",
                                                                    "insertion_auc") else 1)
                     for key, _ in columns]
            lines.append(f"| {model} | {method} | {level} | {len(group)} | " + " | ".join(cells)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def shrink_grids(analysis_dir, max_width=1400):
    """Copies of the FAL-vs-FPN grids at most ``max_width`` px wide in analysis/figures, small
    enough to carry back and commit (the full-size grids have a 256 px cell per image and level)."""
    from PIL import Image

    figures_dir = os.path.join(analysis_dir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    root = os.path.join(analysis_dir, "comparison")
    folders = [os.path.join(pair, "normalized") for pair in sorted(os.listdir(root))
               if "_s0_" in pair] if os.path.isdir(root) else []
    for name in folders:
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for grid in sorted(f for f in os.listdir(folder) if f.startswith("grid_")):
            with Image.open(os.path.join(folder, grid)) as image:
                image = image.convert("RGB")
                scale = min(1.0, max_width / image.width)
                image = image.resize((round(image.width * scale), round(image.height * scale)),
                                     Image.LANCZOS)
                pair = name.split(os.sep)[0]
                image.save(os.path.join(figures_dir, f"{pair}_{grid}"), optimize=True)


# ---------------------------------------------------------------- summary


class Deadline:
    """Start a run only if the time left fits the longest run so far (plus a margin)."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds if seconds else None
        self.longest = 0.0

    def allows(self, name):
        return self.end is None or time.perf_counter() + 1.1 * self.longest + 20 < self.end

    def record(self, seconds):
        self.longest = max(self.longest, seconds)


def runs_markdown(runs):
    """The runs as a Markdown table for docs/RESULTS.md: accuracy, speed, and AD / IC (%, all
    test images, whole maps) with the maps' coverage, of each explanation method and level the
    run evaluated (the budgeted metrics are in the analysis' explanations.md). A resumed run's
    speed and wall time are of its last session, and say where that started."""
    header = ["run", "seed", "attention levels", "top-1 %", "top-5 %", "mean per-class %",
              "train img/s", "wall s", "AD / IC (coverage) per method and level"]

    def number(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, run in runs.items():
        explanations = "; ".join(
            f"{row['method']} {row['level']} {number(row['average_drop'])} / "
            f"{number(row['increase_in_confidence'])}"
            + ("" if row.get("coverage") is None else f" ({row['coverage']:.2f})")
            for row in run["explanation_rows"] if row["class"] == "all")
        starts = run.get("started_at_iterations") or [0]
        resumed = f" (resumed at it. {starts[-1]})" if starts[-1] else ""
        cells = [f"`{name}`", str(run["seed"]), ", ".join(run["attention_levels"]) or "–",
                 number(run["top1"]), number(run["top5"]), number(run["mean_class_acc"]),
                 number(run["train_img_s"], 0) + resumed, number(run["wall_s"], 0) + resumed,
                 explanations or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(output_dir):
    runs = {}
    for name in RUNS:
        path = os.path.join(output_dir, "runs", name, "run_summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                runs[name] = json.load(f)
    summary = {"environment": environment(), "runs": runs}
    for key, name in [("benchmark_gpu", "benchmark_gpu.json"), ("loader", "loader.json"),
                      ("explanations", os.path.join("analysis", "explanations.json"))]:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                summary[key] = json.load(f)
    atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    atomic_write_text(os.path.join(output_dir, "runs.md"), runs_markdown(runs))
    table = [[name, r["top1"], r["mean_class_acc"], r["train_img_s"], r["wall_s"]]
             for name, r in runs.items()]
    print(tabulate(table, headers=["run", "top1", "mean_cls", "train img/s", "wall s"],
                   floatfmt=".3g"))
    return summary


def default_vis_per_class():
    """Heatmap images need OpenCV, which the lent GPU machines lack: their carry (64 MiB) has the
    data (47 MiB) but no room for its wheel (about 50 MB). There the runs score explanations and
    draw none."""
    if importlib.util.find_spec("cv2") is not None:
        return 1
    print("OpenCV is not installed: explanation metrics only, no heatmap images", flush=True)
    return 0


def get_parser():
    parser = ToolArgumentParser(__doc__)
    parser.add_overrides_argument()
    parser.add_argument("--output", default=os.environ.get("OUT", "output/gpu"), metavar="DIR")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_deprecated_override("--device", "MODEL.DEVICE", choices=DEVICES)
    parser.add_argument("--max-iter", type=int, help="override every config's SOLVER.MAX_ITER")
    parser.add_argument("--workers", type=int, default=12, help="DATALOADER.NUM_WORKERS")
    parser.add_argument("--test-batch", type=int, default=64, help="TEST.IMS_PER_BATCH")
    parser.add_argument("--batch-size", type=int, default=128, help="benchmark batch size")
    parser.add_argument("--bench-iters", type=int, default=20)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--loader-batches", type=int, default=60)
    parser.add_argument("--loader-warmup", type=int, default=30)
    parser.add_argument("--deadline-s", type=float, help="start no run that would end after this")
    parser.add_argument("--auc-steps", type=int, default=16,
                        help="steps of the analysis' deletion/insertion curves (0: none)")
    parser.add_argument("--auc-masks", nargs="+", choices=MASKS, default=list(MASKS),
                        help="mask conventions whose comparisons get deletion/insertion curves "
                             "(default: both)")
    parser.add_argument("--analyses", nargs="+", choices=["layers", "comparison"],
                        default=["layers", "comparison"],
                        help="analysis parts: the baseline's layer analysis with level "
                             "selection, and the explanation comparison (default: both)")
    parser.add_argument("--explain-images", type=int,
                        help="explain at most N test images in the analysis, taken in turn from "
                             "each class (default: all)")
    parser.add_argument("--vis-per-class", type=int, default=default_vis_per_class(),
                        help="test images per class drawn as heatmaps (default: 1 where OpenCV is "
                             "installed, else 0: metrics only)")
    return parser


def parse_args(argv=None):
    """The arguments, with ``device``: the overrides' MODEL.DEVICE, which also decides AMP and
    the memory layout."""
    parser = get_parser()
    args = parser.parse_args(argv)
    args.device = override_value(args.opts, "MODEL.DEVICE", DEVICES[0])
    if args.device not in DEVICES:
        parser.error(f"MODEL.DEVICE {args.device}: the experiment runs on one of {DEVICES}")
    return args


def main(argv=None):
    args = parse_args(argv)

    deadline = Deadline(args.deadline_s)
    os.makedirs(args.output, exist_ok=True)
    if "cost" in args.stages:
        stage_cost(args, args.output)
    # The analysis needs only the seed-0 pair: it runs right after them, before the other runs.
    first = [name for name in args.runs if name in ANALYSED_RUNS]
    if "train" in args.stages:
        stage_train(args, args.output, deadline, first)
    if "analysis" in args.stages:
        stage_analysis(args, args.output)
    if "train" in args.stages:
        stage_train(args, args.output, deadline, [name for name in args.runs if name not in first])
        if "analysis" in args.stages:  # the comparisons of the runs trained since
            stage_analysis(args, args.output)
    return summarize(args.output)


if __name__ == "__main__":
    main()
