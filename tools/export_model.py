#!/usr/bin/env python
"""Export a FAL classifier to TorchScript by tracing: class scores and per-level maps, no Python.

    python tools/export_model.py --config-file configs/fal_p2p3.yaml --format torchscript \
        --export-method tracing --output output/export MODEL.WEIGHTS output/fal_p2p3/model_final.pth

The arguments follow Detectron2's tools/deploy/export_model.py. Writes ``<--output>/model.ts``
(atomically), a traced :class:`fal_d2.export.TraceableClassifier`: it takes an (N, 3, H, W) uint8
or float batch, 0-255, in INPUT.FORMAT channel order, resized to INPUT.CLS.SIZE squares, and
returns a dict: ``scores`` and, per attention level, ``class_map/<level>``, ``attention/<level>``,
``attention_raw/<level>`` and ``attention_scores/<level>``. The file also carries
``fal_d2.json`` (read it with ``torch.jit.load(path, _extra_files={"fal_d2.json": ""})``): the
input convention, the outputs' shapes, the class names and the weights' sha256.

The trace is taken on one sample image (--sample-image, else the first image of DATASETS.TEST[0])
and then checked against the eager model on a batch of two uint8 images; an export that does not
reproduce it fails. Without MODEL.WEIGHTS the tool refuses to run unless --allow-random-weights.
"""
import argparse
import json
import logging
import os
import sys

import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import fal_d2  # noqa: F401  (registers models and datasets)
from fal_d2.checkpoint import check_weights_given, file_sha256, load_weights
from fal_d2.config import add_fal_config, merge_config_file
from fal_d2.data import ClassificationDatasetMapper
from fal_d2.data.image_folder import register_from_config
from fal_d2.export import MAP_KINDS, compare_with_eager, trace_classifier
from fal_d2.levels import check_levels
from fal_d2.task import is_classifier
from fal_d2.utils.atomic_io import atomic_open

FORMATS = ("torchscript",)
EXPORT_METHODS = ("tracing",)
METADATA_NAME = "fal_d2.json"
# Every output lies in [0, 1], so an absolute tolerance is meaningful for all of them.
EAGER_TOLERANCE = 1e-4


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", default="torchscript",
                        help=f"output format; supported: {', '.join(FORMATS)}")
    parser.add_argument("--export-method", default="tracing",
                        help=f"how to export; supported: {', '.join(EXPORT_METHODS)}")
    parser.add_argument("--sample-image", metavar="FILE",
                        help="image to trace with (default: the first image of DATASETS.TEST[0])")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="export even without MODEL.WEIGHTS (a randomly initialised model)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS")
    return parser


def check_supported(args):
    """Detectron2's tool also offers caffe2/onnx and scripting; say plainly what this one does."""
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format}: not supported; use {' or '.join(FORMATS)}")
    if args.export_method not in EXPORT_METHODS:
        raise ValueError(f"--export-method {args.export_method}: not supported; use "
                         f"{' or '.join(EXPORT_METHODS)} (the classifier's list-of-dicts "
                         f"interface is not scriptable)")


def setup_cfg(args):
    cfg = get_cfg()
    add_fal_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    register_from_config(cfg)
    if not is_classifier(cfg):
        raise ValueError(f"{args.config_file}: MODEL.META_ARCHITECTURE="
                         f"{cfg.MODEL.META_ARCHITECTURE} is not a FALClassifier; only classifiers "
                         f"can be exported")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("fal_d2").warning("CUDA is not available: tracing on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    check_levels(cfg)
    cfg.freeze()
    return cfg


def read_sample(cfg, sample_image):
    """(the sample as a CHW uint8 tensor, resized as the test mapper does; its path)."""
    if sample_image:
        record = {"file_name": sample_image}
    else:
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty, so there is no test image to trace with; "
                             "pass --sample-image")
        name = cfg.DATASETS.TEST[0]
        try:
            records = DatasetCatalog.get(name)
        except (KeyError, OSError) as error:
            reason = f"{name!r} is not registered" if isinstance(error, KeyError) else error
            raise ValueError(f"no test image to trace with ({reason}); pass --sample-image") from None
        if not records:
            raise ValueError(f"dataset {name!r} is empty; pass --sample-image")
        record = records[0]
    try:
        image = ClassificationDatasetMapper(cfg, is_train=False)(record)["image"]
    except (OSError, ValueError) as error:
        raise ValueError(f"{record['file_name']}: cannot read the sample image: {error}") from None
    return image, record["file_name"]


def describe_outputs(outputs, num_classes):
    """{name: {"shape": [..., with "N" for the batch], "what": ...}} of the traced outputs."""
    described = {}
    for name, tensor in outputs.items():
        kind = name.partition("/")[0]
        what = f"softmax over the {num_classes} classes" if kind == "scores" else MAP_KINDS[kind]
        described[name] = {"shape": ["N"] + list(tensor.shape[1:]), "what": what}
    return described


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    check_supported(args)
    cfg = setup_cfg(args)
    check_weights_given(cfg.MODEL.WEIGHTS, args.allow_random_weights, args.config_file,
                        "pass --allow-random-weights")
    image, sample_path = read_sample(cfg, args.sample_image)

    model = build_model(cfg)
    weights = load_weights(model, cfg, allow_random_weights=args.allow_random_weights,
                           what=args.config_file, opt_in="pass --allow-random-weights")
    image = image.to(model.device)
    traced = trace_classifier(model, image[None].float())

    # Another batch size and dtype than the trace's: what stays fixed in a bad trace shows here.
    check_batch = torch.stack([image, image.flip(-1)])
    differences = compare_with_eager(traced, model, check_batch)
    name, worst = max(differences, key=lambda item: item[1])
    if worst > EAGER_TOLERANCE:
        raise ValueError(f"the traced model differs from the eager model: {name} by {worst:.3g} "
                         f"(tolerance {EAGER_TOLERANCE:g})")

    with torch.no_grad():
        outputs = describe_outputs(traced(check_batch), cfg.MODEL.CLS_HEAD.NUM_CLASSES)
    size = cfg.INPUT.CLS.SIZE
    class_names = (MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes")
                   if cfg.DATASETS.TEST else None)
    if class_names is not None and len(class_names) != cfg.MODEL.CLS_HEAD.NUM_CLASSES:
        class_names = None  # the test set's names are not this model's classes
    metadata = {
        "input": {"name": "images", "shape": ["N", 3, size, size], "dtype": "uint8 or float",
                  "range": [0, 255], "channel_order": cfg.INPUT.FORMAT,
                  "resize": f"to {size}x{size} (INPUT.CLS.SIZE), as at training"},
        "outputs": outputs,
        "class_names": class_names,
        "config_file": args.config_file,
        "weights": weights,
        "weights_sha256": file_sha256(weights) if weights else None,
        "traced_on": cfg.MODEL.DEVICE,
    }
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "model.ts")
    with atomic_open(path) as f:
        torch.jit.save(traced, f, _extra_files={METADATA_NAME: json.dumps(metadata, indent=2)})

    print(f"wrote {path} (TorchScript, traced on {cfg.MODEL.DEVICE} with {sample_path}; "
          f"weights: {weights or 'random (--allow-random-weights)'})")
    print(f"input: images (N, 3, {size}, {size}), uint8 or float, 0-255, {cfg.INPUT.FORMAT} "
          f"order, resized to INPUT.CLS.SIZE; normalised inside")
    print("outputs (a dict of tensors):")
    for name, output in outputs.items():
        shape = "(" + ", ".join(map(str, output["shape"])) + ")"
        print(f"  {name:<24} {shape:<16} {output['what']}")
    if len(outputs) == 1:
        print("no attention branches (MODEL.FAL.ATTENTION_LEVELS is empty): class scores only")
    worst_text = f"{worst:.2g}, {name}" if worst else "none"
    print(f"matches the eager model on a batch of {len(check_batch)} (largest difference: "
          f"{worst_text})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyError, ValueError, FileNotFoundError) as e:
        sys.exit(f"tools/export_model.py: error: {e.args[0] if e.args else e}")
