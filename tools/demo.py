#!/usr/bin/env python
"""Classify images with a trained classifier and save heatmaps of its explanations per level.

    python tools/demo.py --config-file configs/fal_p2p3.yaml --input img.jpg folder/ \\
        --output out/ --opts MODEL.WEIGHTS output/model_final.pth
    python tools/demo.py --config-file configs/fpn_baseline.yaml --input img.jpg --output out/ \\
        --methods gradcam gradcampp --levels p2 p3 --target-class airplane \\
        --opts MODEL.WEIGHTS output/fpn_baseline/model_final.pth

For each image, each method and each level it explains, writes <stem>_<level>_<method>.png: a
JET heatmap of the map blended with the image. --methods defaults to the maps the model computes
itself when it has attention branches (branch_cam, the branch's class map: the explanation, and
attention, the attention map M, the branch's feature gate), else gradcam; --levels defaults to
TEST.EXPLAIN.LEVELS (where a method applies); the class explained is the predicted one unless
--target-class names another (by index or name). A method with no map on a level asked for
(branch_cam on a model without branches) is reported in one line; the others are written.

Folders are searched recursively. An image found in a folder keeps its path relative to that
folder under --output (the tree is mirrored); a file given directly goes to --output itself. When
two inputs would still share a stem (a.jpg beside a.png, two files of the same name given
directly), the later one's stem gets a short hash of its path. predictions.json maps each input
path to the predicted class, its score, the explained class and the heatmap paths.

With --video-input instead of --input, every frame of the video is classified and written to the
video file --output (mp4v; a folder gets <video stem>_explained.mp4): the frame with its
predicted class and score, then one JET overlay per method and level, side by side. The video is
written to a temp file beside it and renamed at the end, so an interrupted run leaves no partial
video under the real name; a video that cannot be opened fails with one line before anything is
written.

    python tools/demo.py --config-file configs/fal_p2p3.yaml --video-input clip.mp4 \\
        --output out/clip_explained.mp4 --opts MODEL.WEIGHTS output/model_final.pth

Overlays are drawn with the longest side capped at --max-side pixels (the maps are computed at
that size), so a 6000x6000 photo costs as much memory as a 1024x1024 one. A file that cannot be
read is reported and skipped; the others go on. Without MODEL.WEIGHTS the demo refuses to run (a
random model labels images too) unless --allow-random-weights.
"""
import contextlib
import hashlib
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

import fal_d2  # noqa: F401  (registers models and datasets)
from fal_d2 import Explainer
from fal_d2.checkpoint import check_weights_given
from fal_d2.config import load_config
from fal_d2.explain import SALIENCY_METHODS, applicable_levels
from fal_d2.predictor import to_bgr_uint8
from fal_d2.utils.atomic_io import atomic_path, atomic_write_bytes, atomic_write_json
from fal_d2.utils.tool_args import ToolArgumentParser

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


def annotate_frame(explainer, frame_bgr, plan, target_class, size):
    """The frame at (height, width) ``size`` with its predicted class and score, then one JET
    overlay per method and level of ``plan`` ({method: levels}), side by side; BGR, for
    ``cv2.VideoWriter``."""
    explained = explain_image(explainer, frame_bgr, plan, target_class, size)
    height, width = size
    if (height, width) != frame_bgr.shape[:2]:
        frame_bgr = cv2.resize(frame_bgr, (width, height), interpolation=cv2.INTER_AREA)
    panels = [frame_bgr.copy()]
    for method, maps in explained.maps.items():
        for level, saliency in maps.items():
            panels.append(explainer.draw(frame_bgr, saliency))
            put_caption(panels[-1], f"{level} {method}")
    name = explained.class_name or str(explained.pred_class)
    put_caption(panels[0], f"{name} {float(explained.scores[explained.pred_class]):.2f}")
    return np.hstack(panels)


def explain_image(explainer, image_bgr, plan, target_class, size):
    """The explanation of ``image_bgr`` by every method of ``plan`` on its levels, maps at
    ``size``: one Explainer call per method, as the methods' levels may differ."""
    results = [explainer(image_bgr, [method], levels, target_class, size)
               for method, levels in plan.items()]
    for result in results[1:]:
        results[0].maps.update(result.maps)
    return results[0]


def method_plan(explainer, methods, levels):
    """{method: the levels it is drawn on}: of --levels (default TEST.EXPLAIN.LEVELS), those
    where it has a map. One line on stderr for each method without a map on a level asked for
    (or, by default, on any level); it fails only when no method has a map at all."""
    methods = methods or explainer.default_methods
    asked = levels or explainer.levels
    plan = {}
    for method in methods:
        drawn, reasons = applicable_levels(method, explainer.model, asked)
        if reasons and (levels or not drawn):
            print(f"{method}: no map on {', '.join(reasons)} ({next(iter(reasons.values()))})",
                  file=sys.stderr)
        if drawn:
            plan[method] = drawn
    if not plan:
        raise ValueError(f"none of the methods {methods} has a map on the levels {asked}")
    return plan


def run_on_video(args, cfg):
    """Classify every frame of --video-input and write the annotated video."""
    output_path = video_output_path(args.video_input, args.output)
    capture, first_frame = open_video(args.video_input)
    try:
        explainer = Explainer(cfg, allow_random_weights=args.allow_random_weights)
        plan = method_plan(explainer, args.methods, args.levels)
        target_class = target_index(explainer, args.target_class)
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if fps > 0 else 30.0  # 0 or NaN when the container does not say
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate, for the bar
        size = even_frame_size(*first_frame.shape[:2], args.max_side)
        frames = itertools.chain([first_frame], read_frames(capture))
        annotated = (annotate_frame(explainer, frame, plan, target_class, size)
                     for frame in frames)
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


def target_index(explainer, target_class):
    """--target-class as a class index (None: the predicted class); checked before any image."""
    return None if target_class is None else explainer.class_index(target_class)


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def get_parser():
    parser = ToolArgumentParser(__doc__)
    parser.add_config_arguments()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files or folders (searched recursively)")
    source.add_argument("--video-input", help="a video file: every frame is classified")
    parser.add_argument("--output", required=True,
                        help="folder for heatmaps and predictions.json; with --video-input, the "
                             f"video to write ({', '.join(VIDEO_EXTENSIONS)}) or a folder for "
                             "<video stem>_explained.mp4")
    parser.add_argument("--methods", nargs="+", choices=sorted(SALIENCY_METHODS),
                        metavar="METHOD",
                        help=f"saliency methods to draw, of {', '.join(sorted(SALIENCY_METHODS))} "
                             f"(default: head when the model has an explanation head, else "
                             f"branch_cam and attention when it has attention branches, else "
                             f"gradcam)")
    parser.add_argument("--levels", nargs="+",
                        help="levels to explain (default: TEST.EXPLAIN.LEVELS, where a method "
                             "applies)")
    parser.add_argument("--target-class", metavar="CLASS",
                        help="class to explain, by index or name (default: the predicted class)")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="longest side of the overlays in pixels (default 1024; 0: the "
                             "image's own size, which costs memory on large images)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even without MODEL.WEIGHTS (a randomly initialised model)")
    parser.add_deprecated_override("--device", "MODEL.DEVICE", metavar="DEVICE")
    return parser


def save_png(path, image_bgr):
    ok, buffer = cv2.imencode(".png", image_bgr)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the overlay as PNG")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, buffer.tobytes())


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
    explainer = Explainer(cfg, allow_random_weights=args.allow_random_weights)
    plan = method_plan(explainer, args.methods, args.levels)
    target_class = target_index(explainer, args.target_class)

    predictions, failures = {}, 0
    for path, stem in tqdm(inputs, desc="images", unit="img"):
        try:
            image_bgr = read_bgr(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            tqdm.write(f"skipped {path}: {error}", file=sys.stderr)
            failures += 1
            continue
        height, width = overlay_size(*image_bgr.shape[:2], args.max_side)
        explained = explain_image(explainer, image_bgr, plan, target_class, (height, width))
        if (height, width) != image_bgr.shape[:2]:
            image_bgr = np.asarray(Image.fromarray(image_bgr).resize((width, height), Image.BILINEAR))
        heatmaps = {}
        for method, maps in explained.maps.items():
            for level, saliency in maps.items():
                heatmap = os.path.join(args.output, f"{stem}_{level}_{method}.png")
                save_png(heatmap, explainer.draw(image_bgr, saliency))
                heatmaps.setdefault(method, {})[level] = heatmap
        pred = explained.pred_class
        predictions[path] = {
            "pred_class": pred,
            "class_name": explained.class_name or str(pred),
            "score": float(explained.scores[pred]),
            "explained_class": explained.target_class,
            "explained_name": explained.target_name or str(explained.target_class),
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
