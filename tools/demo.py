#!/usr/bin/env python
"""Classify images with a trained FAL model and save its built-in explanation maps per level.

    python tools/demo.py --config-file configs/fal_p2p3.yaml --input img.jpg folder/ \
        --output out/ MODEL.WEIGHTS output/model_final.pth

For each image and each level with an attention branch, writes ``<stem>_<level>_class_map.png``
(the branch's class map of the predicted class: the explanation) and
``<stem>_<level>_attention.png`` (the attention map M, the branch's feature gate), each a JET
heatmap blended with the image, and adds the predicted class, its score and the heatmap paths to
``predictions.json``. A file that cannot be read is reported and skipped; the others go on.
"""
import argparse
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
from fal_d2.config import add_fal_config
from fal_d2.explain.visualize import overlay_heatmap
from fal_d2.predictor import FALPredictor, to_bgr_uint8
from fal_d2.utils.atomic_io import atomic_write_bytes, atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


def read_bgr(path):
    """Read any PIL-readable image (grayscale, RGBA, 16-bit...) as HxWx3 uint8 BGR."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode not in ("L", "RGB", "RGBA", "I;16", "I;16L", "I;16B"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        array = np.asarray(image)
    if array.ndim == 3:
        array = array[:, :, [2, 1, 0] + list(range(3, array.shape[2]))]  # RGB(A) -> BGR(A)
    return to_bgr_uint8(array)


def list_inputs(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            paths.append(item)
    return paths


def setup_cfg(args):
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="folder for heatmaps and predictions.json")
    parser.add_argument("--device", help="override MODEL.DEVICE, e.g. cpu")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    cfg = setup_cfg(args)
    predictor = FALPredictor(cfg)
    class_names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None
    os.makedirs(args.output, exist_ok=True)

    predictions, failures = {}, 0
    for path in tqdm(list_inputs(args.input), desc="images", unit="img"):
        try:
            image_bgr = read_bgr(path)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
            failures += 1
            continue
        output = predictor(image_bgr)
        pred = output["pred_class"]
        stem = os.path.splitext(os.path.basename(path))[0]
        heatmaps = {"class_map": {}, "attention": {}}
        for kind, maps in heatmaps.items():
            for level, saliency in output[kind].items():
                overlay = overlay_heatmap(image_bgr[:, :, ::-1], saliency.cpu().numpy())
                maps[level] = os.path.join(args.output, f"{stem}_{level}_{kind}.png")
                buffer = io.BytesIO()
                Image.fromarray(overlay).save(buffer, format="PNG")
                atomic_write_bytes(maps[level], buffer.getvalue())
        predictions[path] = {
            "pred_class": pred,
            "class_name": class_names[pred] if class_names else str(pred),
            "score": float(output["scores"][pred]),
            "heatmaps": heatmaps,
        }
    atomic_write_json(os.path.join(args.output, "predictions.json"), predictions)
    print(f"{len(predictions)} images classified, {failures} skipped; results in {args.output}")
    return 0 if predictions or not failures else 1


if __name__ == "__main__":
    sys.exit(main())
