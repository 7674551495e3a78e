#!/usr/bin/env python
"""Cost of FAL against the plain FPN: params, FLOPs, training/inference speed, explanation cost.

    python tools/benchmark.py                              # R-50 FPN, 256 px, on the CPU
    python tools/benchmark.py --output docs/benchmark_cpu.json
    python tools/benchmark.py --batch-size 128 --iters 20 --amp --opts MODEL.DEVICE cuda
    python tools/benchmark.py --config-file configs/fpn_baseline.yaml configs/fal_p2.yaml

The first --config-file is the baseline that ratios are taken against. Every config runs on
MODEL.DEVICE of the overrides, the CPU by default. Synthetic inputs isolate the model's cost from
data loading. --amp runs every measurement under fp16 autocast (training with a GradScaler), as
Detectron2's AMPTrainer trains with SOLVER.AMP.ENABLED. Results go to stdout as a table and, with
--output, to JSON. A config with an explanation head (MODEL.EXPLAIN_HEAD) is timed with the head:
in inference its maps are computed, in training its objective runs (outside a trainer it ignores
START_ITER), and with TRAIN_ONLY_HEAD the training step is the second stage's.
"""
import contextlib
import datetime
import platform
import time

import torch
from tabulate import tabulate

from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis

import fal_d2  # noqa: F401  (registers models)
from fal_d2.config import load_config
from fal_d2.explain import applicable_levels, build_saliency_method
from fal_d2.utils.atomic_io import atomic_write_json
from fal_d2.utils.tool_args import ToolArgumentParser, override_value

DEFAULT_CONFIGS = ["configs/fpn_baseline.yaml", "configs/fal_p2p3.yaml", "configs/fal_all.yaml"]
DEFAULT_DEVICE = "cpu"


def load_cfg(config_file, device, opts):
    cfg = load_config(config_file, opts)
    cfg.MODEL.DEVICE = device
    return cfg


def synthetic_batch(cfg, batch_size, device):
    size = cfg.INPUT.CLS.SIZE
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator).to(device),
            "label": i % cfg.MODEL.CLS_HEAD.NUM_CLASSES,
            "height": size,
            "width": size,
        }
        for i in range(batch_size)
    ]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def images_per_second(step, batch_size, iters, warmup, device):
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return batch_size * iters / (time.perf_counter() - start)


def count_flops(model, cfg, device):
    """GFLOPs of one image's inference, as fvcore counts them (one fused multiply-add = one flop).
    Detectron2's FlopCountAnalysis traces the model on its usual list-of-dicts input."""
    model.eval()
    inputs = [{"image": synthetic_batch(cfg, 1, device)[0]["image"]}]
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9


def precision(amp, device):
    """fp16 autocast when ``amp``, else full precision: the context every measured step runs in."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.float16)


def measure_training(model, cfg, batch_size, iters, warmup, device, amp=False):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp)
    batch = synthetic_batch(cfg, batch_size, device)

    def step():
        with precision(amp, device):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    return images_per_second(step, batch_size, iters, warmup, device)


def measure_inference(model, cfg, batch_size, iters, warmup, device, amp=False):
    model.eval()
    batch = synthetic_batch(cfg, batch_size, device)

    def step():
        with torch.no_grad(), precision(amp, device):
            model(batch)

    return images_per_second(step, batch_size, iters, warmup, device)


def measure_explanation_ms(model, cfg, method, levels, batch_size, iters, warmup, device, amp=False):
    """Milliseconds per image to get ``method``'s maps for ``levels`` (None if it does not apply)."""
    levels, _ = applicable_levels(method, model, levels)
    if not levels:
        return None
    saliency = build_saliency_method(method, model, levels)
    batch = synthetic_batch(cfg, batch_size, device)

    def step():
        with precision(amp, device):
            saliency(batch)

    speed = images_per_second(step, batch_size, iters, warmup, device)
    return 1000.0 / speed


def benchmark(args):
    rows = []
    for config_file in args.config_file:
        cfg = load_cfg(config_file, args.device, args.opts)
        torch.manual_seed(0)
        model = build_model(cfg)
        explain_levels = list(cfg.TEST.EXPLAIN.LEVELS)
        row = {
            "config": config_file,
            "attention_levels": list(cfg.MODEL.FAL.ATTENTION_LEVELS),
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": count_flops(model, cfg, args.device),
        }
        timing = (args.batch_size, args.iters, args.warmup, args.device, args.amp)
        row["train_img_s"] = measure_training(model, cfg, *timing)
        row["infer_img_s"] = measure_inference(model, cfg, *timing)
        for method in ("attention", "branch_cam", "gradcam"):
            row[f"{method}_ms_img"] = measure_explanation_ms(model, cfg, method, explain_levels, *timing)
        rows.append(row)
        print(f"measured {config_file}", flush=True)
    base = rows[0]
    for row in rows:
        for key in ("params_M", "gflops", "train_img_s", "infer_img_s"):
            row[f"{key}_ratio"] = row[key] / base[key]
        row["train_time_ratio"] = base["train_img_s"] / row["train_img_s"]
        if row["attention_ms_img"] and row["gradcam_ms_img"]:
            row["gradcam_over_attention"] = row["gradcam_ms_img"] / row["attention_ms_img"]
        if row["branch_cam_ms_img"] and row["gradcam_ms_img"]:
            row["gradcam_over_branch_cam"] = row["gradcam_ms_img"] / row["branch_cam_ms_img"]
    return rows


def environment(args):
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "iters": args.iters,
        "amp": args.amp,
        "opts": args.opts,
    }


def get_parser():
    parser = ToolArgumentParser(__doc__)
    parser.add_config_arguments(nargs="+", default=DEFAULT_CONFIGS,
                                help="configs to measure; the first is the baseline")
    parser.add_deprecated_alias("--configs", "--config-file", dest="config_file", nargs="+",
                                metavar="FILE")
    parser.add_deprecated_override("--device", "MODEL.DEVICE", metavar="DEVICE")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="fp16 autocast, as SOLVER.AMP.ENABLED trains")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.device = override_value(args.opts, "MODEL.DEVICE", DEFAULT_DEVICE)

    rows = benchmark(args)
    columns = ["config", "params_M", "gflops", "gflops_ratio", "train_img_s", "train_time_ratio",
               "infer_img_s", "attention_ms_img", "branch_cam_ms_img", "gradcam_ms_img",
               "gradcam_over_attention", "gradcam_over_branch_cam"]
    print(tabulate([[row.get(c) for c in columns] for row in rows], headers=columns, floatfmt=".3g"))
    if args.output:
        atomic_write_json(args.output, {"environment": environment(args), "results": rows})
        print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()
