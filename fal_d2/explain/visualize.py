"""Heatmap overlays and image grids of explanations, as in the paper's figures.

Heatmaps are OpenCV colour maps, blended as pytorch-grad-cam blends them. OpenCV is imported when
the first overlay is drawn, not with this module: the evaluator and the tools that import it still
score explanations on a machine without it (the lent GPU machines, whose carry has no room for
its wheel), with heatmap images off. Figures are drawn on a bare Agg canvas (not pyplot), so that
no global backend or figure registry is touched, and saved atomically. A detector's explained
detection is drawn on the input and on every heatmap of its image (PIL), with its class and score.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from fal_d2.utils.atomic_io import atomic_save_figure

__all__ = [
    "ExplanationSample",
    "overlay_heatmap",
    "draw_overlay",
    "draw_box",
    "sample_image",
    "sample_overlay",
    "save_grid_figure",
    "explanation_grid",
]

GridCell = Tuple[Optional[np.ndarray], str]  # (RGB uint8 image or None for a blank cell, caption)


@dataclass
class ExplanationSample:
    """One image kept for drawing: small, so that an evaluator can keep a few per class."""

    image_id: str  # pairs the same image across models
    image: np.ndarray  # (h, w, 3) uint8 RGB, downscaled
    class_name: str  # row class: the ground truth (classifiers), the explained class (detectors)
    target_name: str  # explained class
    # (method, level) -> (h, w) uint8 saliency, 255 standing for 1
    maps: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)
    drop: Dict[Tuple[str, str], float] = field(default_factory=dict)  # per-image Average Drop %
    increase: Dict[Tuple[str, str], bool] = field(default_factory=dict)  # O > Y
    # the explained detection (detectors), XYXY in ``image`` pixels, and its "class score" caption
    box: Optional[Tuple[float, float, float, float]] = None
    box_caption: str = ""


def _opencv():
    try:
        import cv2
        return cv2
    except ImportError as error:
        raise ImportError(
            "heatmap overlays need OpenCV (pip install opencv-python-headless); without it, set "
            "TEST.EXPLAIN.VIS_PER_CLASS 0 (tools/explain.py: --vis-per-class 0)"
        ) from error


def overlay_heatmap(image_rgb_uint8: np.ndarray, saliency01, alpha: float = 0.5,
                    colormap: Optional[int] = None) -> np.ndarray:
    """
    Blend an OpenCV colour map of ``saliency01`` (values in [0, 1], resized bilinearly to the
    image if needed) over the image: alpha * heatmap + (1 - alpha) * image. Returns an (H, W, 3)
    uint8 RGB image.

    This is how pytorch-grad-cam's ``show_cam_on_image(img, mask, use_rgb=True,
    image_weight=1 - alpha)`` draws, so that our maps and Grad-CAM's look alike: the saliency is
    quantised as ``uint8(255 * s)``, coloured by ``cv2.applyColorMap`` (BGR, turned to RGB;
    ``colormap`` defaults to ``cv2.COLORMAP_JET``) and blended. It then divides by the blend's
    maximum; we do not, so that the tiles of a grid and the frames of a video keep the image's
    own brightness instead of each being stretched by its brightest pixel.
    """
    image = np.asarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    saliency = torch.as_tensor(np.asarray(saliency01, dtype=np.float32))
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be (h, w), got shape {tuple(saliency.shape)}")
    if tuple(saliency.shape) != image.shape[:2]:
        saliency = F.interpolate(saliency[None, None], size=image.shape[:2], mode="bilinear",
                                 align_corners=False)[0, 0]
    # uint8 colours and a uint8 blend (addWeighted rounds and saturates), so a large image's
    # overlay stays small
    levels = (saliency.clamp(0, 1) * 255).to(torch.uint8).numpy()  # truncates, as grad-cam does
    cv2 = _opencv()
    heatmap = cv2.applyColorMap(levels, cv2.COLORMAP_JET if colormap is None else colormap)
    cv2.cvtColor(heatmap, cv2.COLOR_BGR2RGB, dst=heatmap)
    return cv2.addWeighted(heatmap, alpha, np.ascontiguousarray(image), 1 - alpha, 0.0)


def draw_overlay(image_bgr: np.ndarray, saliency01, alpha: float = 0.5,
                 colormap: Optional[int] = None) -> np.ndarray:
    """
    :func:`overlay_heatmap` in OpenCV's channel order: the heatmap of ``saliency01`` over an
    (H, W, 3) uint8 BGR image (``cv2.imread``), returned as BGR for ``cv2.imwrite``.
    """
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 BGR, got {image.dtype} {image.shape}")
    overlay = overlay_heatmap(np.ascontiguousarray(image[:, :, ::-1]), saliency01, alpha, colormap)
    return np.ascontiguousarray(overlay[:, :, ::-1])


def draw_box(
    image_rgb_uint8: np.ndarray,
    box: Sequence[float],
    caption: str = "",
    color: Tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """
    A copy of the (H, W, 3) uint8 RGB image with ``box`` (x0, y0, x1, y1 in pixels) outlined in
    ``color`` over a black edge, so that it shows on any heatmap, and ``caption`` on a black label
    above the box (inside it when there is no room above).
    """
    image = np.asarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])) or x1 < x0 or y1 < y0:
        raise ValueError(f"not a box: {tuple(box)}")
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0))
    draw.rectangle([x0, y0, x1, y1], outline=color)
    if caption:
        font = ImageFont.load_default()
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        width, height = right - left + 2, bottom - top + 2
        x = min(max(x0, 0.0), max(0.0, canvas.width - width))
        y = y0 - height - 1 if y0 - height - 1 >= 0 else max(y0, 0.0) + 1
        draw.rectangle([x, y, x + width, y + height], fill=(0, 0, 0))
        draw.text((x + 1 - left, y + 1 - top), caption, fill=color, font=font)
    return np.asarray(canvas)


def sample_image(sample: ExplanationSample) -> np.ndarray:
    """The sample's input image, with its explained detection if it has one."""
    if sample.box is None:
        return sample.image
    return draw_box(sample.image, sample.box, sample.box_caption)


def sample_overlay(sample: ExplanationSample, key: Tuple[str, str]) -> np.ndarray:
    """The heatmap of (method, level) ``key`` over the sample, with its explained detection."""
    overlay = overlay_heatmap(sample.image, sample.maps[key] / 255.0)
    if sample.box is None:
        return overlay
    return draw_box(overlay, sample.box, sample.box_caption)


def save_grid_figure(
    rows: Sequence[Sequence[GridCell]],
    columns: Sequence[str],
    path: str,
    row_labels: Optional[Sequence[str]] = None,
    title: str = "",
    cell_size: float = 1.7,
    dpi: int = 100,
):
    """
    Save a grid of images, one row per image and one column per panel, atomically.

    Args:
        rows: per row, one ``(image, caption)`` per column; ``image`` is (H, W, 3) uint8 RGB or
            None for a blank cell; the caption (e.g. metric values) goes under the column title.
        columns: column titles, shown above the first row.
        row_labels: shown left of each row (e.g. the class names).
    """
    if not rows:
        raise ValueError(f"{path}: no rows to draw")
    bad = [i for i, row in enumerate(rows) if len(row) != len(columns)]
    if bad:
        raise ValueError(f"{path}: rows {bad} do not have one cell per column ({len(columns)})")
    height = cell_size * len(rows) + 0.6
    figure = Figure(figsize=(cell_size * len(columns), height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, (image, caption) in enumerate(row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.axis("off")
            else:
                ax.imshow(image)
            header = columns[c] if r == 0 else ""
            ax.set_title("\n".join(filter(None, [header, caption])), fontsize=7)
        if row_labels is not None:
            axes[r][0].set_ylabel(row_labels[r], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    # tight_layout ignores the suptitle: keep ~0.4 inch free above the first row for it.
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height) if title else None)
    atomic_save_figure(figure, path, dpi=dpi)


def explanation_grid(
    models: Sequence[Tuple[str, Sequence[ExplanationSample]]],
    method: str,
    levels_per_model: Sequence[Sequence[str]],
) -> Tuple[List[List[GridCell]], List[str], List[str]]:
    """
    Rows, column titles and row labels of a grid for :func:`save_grid_figure`: the input, then
    each model's heatmaps of ``method`` on its levels, side by side (e.g. FPN vs FAL). Rows are the
    first model's samples; another model's cells are blank where it has no sample of that image.
    Detections are drawn on the cells of their own model's sample.
    """
    first_samples = models[0][1]
    by_id = [{sample.image_id: sample for sample in samples} for _, samples in models]
    columns = ["input"] + [
        f"{label}: {method} {level}" if len(models) > 1 else f"{method} {level}"
        for (label, _), levels in zip(models, levels_per_model)
        for level in levels
    ]
    rows, row_labels = [], []
    for first in first_samples:
        row = [(sample_image(first), "")]
        for samples, levels in zip(by_id, levels_per_model):
            sample = samples.get(first.image_id)
            for level in levels:
                key = (method, level)
                if sample is None or key not in sample.maps:
                    row.append((None, ""))
                    continue
                caption = (f"drop {sample.drop[key]:.1f}%, "
                           f"inc {'yes' if sample.increase[key] else 'no'}")
                if sample.target_name != first.target_name:  # models may predict differently
                    caption += f"\n(explained: {sample.target_name})"
                row.append((sample_overlay(sample, key), caption))
        rows.append(row)
        if first.box is not None:
            row_labels.append(f"top detection:\n{first.box_caption or first.target_name}")
        else:
            row_labels.append(f"{first.class_name}\n(explained: {first.target_name})")
    return rows, columns, row_labels
