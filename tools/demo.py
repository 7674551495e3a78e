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

With --video-input instead of --input, every frame of the video is classified and written to the
video file --output (mp4v; a folder gets ``<video stem>_explained.mp4``): the frame with its
predicted class and score, then one JET overlay of the class map per explained level, side by
side. The video is written to a temp file beside it and renamed at the end, so an interrupted run
leaves no partial video under the real name; a video that cannot be opened fails with one line
before anything is written.

    python tools/demo.py --config-file configs/fal_p2p3.yaml --video-input clip.mp4 \
        --output out/clip_explained.mp4 MODEL.WEIGHTS output/model_final.pth

Overlays are drawn with the longest side capped at --max-side pixels (the model returns its maps
at that size), so a 6000x6000 photo costs as much memory as a 1024x1024 one. A file that cannot
be read is reported and skipped; the others go on. Without MODEL.WEIGHTS the demo refuses to run
(a random model labels images too) unless --allow-random-weights.
"""
import argparse
import contextlib
import hashlib
import io
import itertools
import logging
import os
import sys

# ffmpeg's own message for an unreadable video ("moov atom not found") would precede the demo's
# one-line error; set OPENCV_FFMPEG_LOGLEVEL (e.g. 32) to see ffmpeg's messages again.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")

import cv2  # noqa: E402  (after the log level, which OpenCV reads once)
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
from fal_d2.utils.atomic_io import atomic_path, atomic_write_bytes, atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv")  # containers that take mp4v here


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


def even_frame_size(height, width, max_side):
    """:func:`overlay_size` rounded down to even sides: the mp4v encoder crops an odd side, which
    would cut a column off the last panel."""
    height, width = overlay_size(height, width, max_side)
    return max(2, height - height % 2), max(2, width - width % 2)


def video_output_path(video_input, output):
    """The video to write: --output itself, or ``<video stem>_explained.mp4`` in it when it is a
    folder. Never the input video itself."""
    if os.path.isdir(output):
        stem = os.path.splitext(os.path.basename(video_input))[0]
        output = os.path.join(output, f"{stem}_explained.mp4")
    elif not output.lower().endswith(VIDEO_EXTENSIONS):
        raise ValueError(f"--output {output}: with --video-input, name a video file "
                         f"({', '.join(VIDEO_EXTENSIONS)}) or an existing folder")
    if os.path.realpath(output) == os.path.realpath(video_input):
        raise ValueError(f"--output {output}: that is the input video")
    return output


def open_video(path):
    """A ``cv2.VideoCapture`` of ``path`` and its first frame (BGR); a missing file, a file that
    is not a video and a video without frames fail with one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--video-input {path}: no such file")
    capture = cv2.VideoCapture(path)
    ok, frame = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise ValueError(f"--video-input {path}: not a video OpenCV can read, or it has no frames")
    return capture, frame


def read_frames(capture):
    """The remaining frames of ``capture`` (BGR), until it has no more."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


@contextlib.contextmanager
def atomic_video_writer(path, fps, size):
    """A ``cv2.VideoWriter`` (mp4v) of (height, width) ``size`` frames, written through
    :func:`~fal_d2.utils.atomic_io.atomic_path`: under its real name only once complete."""
    height, width = size
    with atomic_path(path) as tmp_path:
        writer = cv2.VideoWriter(tmp_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        try:
            if not writer.isOpened():
                raise ValueError(f"--output {path}: OpenCV cannot write an mp4v video there")
            yield writer
        finally:
            writer.release()


def put_caption(image, text):
    """Write ``text`` at the top left of ``image`` (in place), white on a black label so that it
    reads on any frame or heatmap, sized to the image."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.3, image.shape[0] / 600)
    thickness = max(1, round(scale * 1.5))
    (width, height), baseline = cv2.getTextSize(text, font, scale, thickness)
    margin = max(2, height // 3)
    cv2.rectangle(image, (0, 0), (width + 2 * margin, height + baseline + 2 * margin), (0, 0, 0),
                  cv2.FILLED)
    cv2.putText(image, text, (margin, margin + height), font, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)


def annotate_frame(predictor, frame_bgr, class_names, size):
    """The frame at (height, width) ``size`` with its predicted class and score, then one JET
    overlay of the class map per explained level, side by side; BGR, for ``cv2.VideoWriter``."""
    output = predictor(frame_bgr, output_size=size)
    height, width = size
    if (height, width) != frame_bgr.shape[:2]:
        frame_bgr = cv2.resize(frame_bgr, (width, height), interpolation=cv2.INTER_AREA)
    frame_rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    panels = [frame_rgb]
    for level, saliency in output["class_map"].items():
        panels.append(overlay_heatmap(frame_rgb, saliency.cpu().numpy()))
        put_caption(panels[-1], f"{level} class map")
    pred = output["pred_class"]
    name = class_names[pred] if class_names else str(pred)
    put_caption(frame_rgb, f"{name} {float(output['scores'][pred]):.2f}")  # after the overlays
    return cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR)


def load_predictor(cfg, allow_random_weights):
    """The predictor and the test set's class names (None when the config names no test set)."""
    predictor = FALPredictor(cfg, allow_random_weights=allow_random_weights)
    if not cfg.DATASETS.TEST:
        return predictor, None
    return predictor, MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes")


def run_on_video(args, cfg):
    """Classify every frame of --video-input and write the annotated video."""
    output_path = video_output_path(args.video_input, args.output)
    capture, first_frame = open_video(args.video_input)
    try:
        predictor, class_names = load_predictor(cfg, args.allow_random_weights)
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if fps > 0 else 30.0  # 0 or NaN when the container does not say
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate, for the bar
        size = even_frame_size(*first_frame.shape[:2], args.max_side)
        frames = itertools.chain([first_frame], read_frames(capture))
        annotated = (annotate_frame(predictor, frame, class_names, size) for frame in frames)
        first = next(annotated)  # its width, with the panels, sizes the writer
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        count = 0
        with atomic_video_writer(output_path, fps, first.shape[:2]) as writer:
            for image in tqdm(itertools.chain([first], annotated), total=total, desc="frames",
                              unit="frame"):
                writer.write(image)
                count += 1
    finally:
        capture.release()
    print(f"{count} frames classified; video in {output_path}")
    return 0


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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files or folders (searched recursively)")
    source.add_argument("--video-input", help="a video file: every frame is classified")
    parser.add_argument("--output", required=True,
                        help="folder for heatmaps and predictions.json; with --video-input, the "
                             f"video to write ({', '.join(VIDEO_EXTENSIONS)}) or a folder for "
                             "<video stem>_explained.mp4")
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
    if args.video_input:
        return run_on_video(args, cfg)
    inputs = unique_stems(list_inputs(args.input))
    if not inputs:
        print(f"tools/demo.py: error: no images ({', '.join(IMAGE_EXTENSIONS)}) found in "
              f"{args.input}", file=sys.stderr)
        return 1
    predictor, class_names = load_predictor(cfg, args.allow_random_weights)

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
