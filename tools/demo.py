#!/usr/bin/env python
"""Classify images with a trained FAL model and save its built-in explanation maps per level.

    python tools/demo.py --config-file configs/fal_p2p3.yaml --input img.jpg folder/ \
        --output out/ MODEL.WEIGHTS output/model_final.pth

Folders are searched recursively. For each image and each level with an attention branch, writes
``<stem>_<level>_class_map.png`` (the branch's class map of the predicted class: the explanation)
and ``<stem>_<level>_attention.png`` (the attention map M, the branch's feature gate), each a JET
heatmap blended with the image. An image found in a folder keeps its path relative to that folder
under --output (the tree is mirrored); a file given directly goes to --output itself. When two
inputs would still share a stem (``a.jpg`` beside ``a.png``, two files of the same name given
directly), the later one's stem gets a short hash of its path. ``predictions.json`` maps each
input path to the predicted class, its score and the heatmap paths.

Overlays are drawn with the longest side capped at --max-side pixels (the model returns its maps
at that size), so a 6000x6000 photo costs as much memory as a 1024x1024 one. A file that cannot
be read is reported and skipped; the others go on. Without MODEL.WEIGHTS the demo refuses to run
(a random model labels images too) unless --allow-random-weights.
"""
import argparse
import hashlib
import io
import logging
import os
import sys

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

import fal_d2  # noqa: F401  (registers models and datasets)
from fal_d2.checkpoint import check_weights_given
from fal_d2.config import add_fal_config, merge_config_file
from fal_d2.explain.visualize import overlay_heatmap
from fal_d2.predictor import FALPredictor, to_bgr_uint8
from fal_d2.utils.atomic_io import atomic_write_bytes, atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


def read_bgr(path):
    """Read any PIL-readable image (grayscale, RGBA, 16-bit...) as HxWx3 uint8 BGR."""
    with Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no second full-size image
        if image.mode not in ("L", "RGB", "RGBA", "I;16", "I;16L", "I;16B"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        array = np.asarray(image)
    if array.ndim == 3:
        array = array[:, :, [2, 1, 0] + list(range(3, array.shape[2]))]  # RGB(A) -> BGR(A)
    return to_bgr_uint8(array)


def list_inputs(inputs):
    """(path, output stem) of every image: a folder is searched recursively and its tree
    mirrored; a file given directly keeps its own name. Each path is listed once."""
    found, seen = [], set()
    for item in inputs:
        if os.path.isdir(item):
            entries = []
            for directory, subdirs, names in os.walk(item):
                subdirs.sort()
                entries += [os.path.join(directory, name) for name in sorted(names)
                            if name.lower().endswith(IMAGE_EXTENSIONS)]
            entries = [(path, os.path.relpath(path, item)) for path in entries]
        else:
            entries = [(item, os.path.basename(item))]
        for path, relative in entries:
            if os.path.abspath(path) not in seen:
                seen.add(os.path.abspath(path))
                found.append((path, os.path.splitext(relative)[0]))
    return found


def unique_stems(entries):
    """The same entries, a short hash of the path added to any stem already taken, so that no
    output overwrites another (compared case-insensitively, for macOS and Windows disks)."""
    taken, unique = set(), []
    for path, stem in entries:
        if stem.lower() in taken:
            stem += "-" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
        taken.add(stem.lower())
        unique.append((path, stem))
    return unique


def overlay_size(height, width, max_side):
    """(height, width) with the longest side at most ``max_side`` (0: unchanged)."""
    if max_side <= 0 or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def setup_cfg(args):
    cfg = get_cfg()
    add_fal_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files or folders (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for heatmaps and predictions.json")
    parser.add_argument("--device", help="override MODEL.DEVICE, e.g. cpu")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="longest side of the overlays in pixels (default 1024; 0: the "
                             "image's own size, which costs memory on large images)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even without MODEL.WEIGHTS (a randomly initialised model)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS")
    return parser


def save_png(path, image_rgb):
    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    cfg = setup_cfg(args)
    check_weights_given(cfg.MODEL.WEIGHTS, args.allow_random_weights, args.config_file,
                        "pass --allow-random-weights")
    inputs = unique_stems(list_inputs(args.input))
    if not inputs:
        print(f"tools/demo.py: error: no images ({', '.join(IMAGE_EXTENSIONS)}) found in "
              f"{args.input}", file=sys.stderr)
        return 1
    predictor = FALPredictor(cfg, allow_random_weights=args.allow_random_weights)
    class_names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None

    predictions, failures = {}, 0
    for path, stem in tqdm(inputs, desc="images", unit="img"):
        try:
            image_bgr = read_bgr(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            tqdm.write(f"skipped {path}: {error}", file=sys.stderr)
            failures += 1
            continue
        height, width = overlay_size(*image_bgr.shape[:2], args.max_side)
        output = predictor(image_bgr, output_size=(height, width))
        if (height, width) != image_bgr.shape[:2]:
            # Resize first (channel order does not matter to it), so that the flip copies a small image.
            image_bgr = np.asarray(Image.fromarray(image_bgr).resize((width, height), Image.BILINEAR))
        image_rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        pred = output["pred_class"]
        heatmaps = {"class_map": {}, "attention": {}}
        for kind, maps in heatmaps.items():
            for level, saliency in output[kind].items():
                maps[level] = os.path.join(args.output, f"{stem}_{level}_{kind}.png")
                save_png(maps[level], overlay_heatmap(image_rgb, saliency.cpu().numpy()))
        predictions[path] = {
            "pred_class": pred,
            "class_name": class_names[pred] if class_names else str(pred),
            "score": float(output["scores"][pred]),
            "heatmaps": heatmaps,
        }
    os.makedirs(args.output, exist_ok=True)
    atomic_write_json(os.path.join(args.output, "predictions.json"), predictions)
    print(f"{len(predictions)} images classified, {failures} skipped; results in {args.output}")
    return 0 if predictions else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyError, ValueError, FileNotFoundError) as e:
        sys.exit(f"tools/demo.py: error: {e.args[0] if e.args else e}")
