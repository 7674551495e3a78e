"""One self-contained HTML page per evaluation: accuracy, confusion matrix, explanations, heatmaps.

Why self-contained: the page is copied off training machines, attached to issues and opened
offline. Images are embedded as base64 data URIs, the CSS is inline, there is no JavaScript, and a
Content-Security-Policy forbids fetching anything, so the page shows exactly what the file holds.
All text from data (class names, captions, notes) is HTML-escaped.
"""

import base64
import glob
import html
import json
import math
import mimetypes
import numbers
import os
import re
from typing import Iterable, Optional, Sequence, Tuple, Union

from fal_d2.evaluation.budgets import (
    budget_suffix,
    describe_budgets,
    table_budget_mode,
    table_budgets,
)
from fal_d2.evaluation.random_control import CONTROL_MARK, CONTROL_NOTE, RandomControl
from fal_d2.utils.atomic_io import atomic_write_text

__all__ = ["render_html_report", "write_evaluation_report", "write_html_report"]

# Methods in the order a reader compares them; methods not listed follow in name order.
METHOD_TITLES = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "attention": "Attention map M",
    "branch_cam": "Branch class map",
    "fused": "Fused",
    "random": "Random control",
}
# (row key, column title, short title for the wide per-class tables, higher is better; None:
# neither, no best value is marked). The budgeted columns come first: see explanation_metrics.
EXPLANATION_METRICS = [
    ("average_drop", "Average Drop % ↓ (whole map)", "AD ↓", False),
    ("increase_in_confidence", "Increase in Confidence % ↑ (whole map)", "IC ↑", True),
    ("coverage", "Coverage (mean of the map)", "Cov", None),
    ("deletion_auc", "Deletion AUC ↓", "Del ↓", False),
    ("insertion_auc", "Insertion AUC ↑", "Ins ↑", True),
]

ACCURACY_TITLES = {
    "top1": "Top-1 accuracy %",
    "top5": "Top-5 accuracy %",
    "mean_class_acc": "Mean per-class accuracy %",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# No fetches of any kind; inline styles and data-URI images only.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; }
h2 { font-size: 19px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 15px; margin: 20px 0 6px; }
nav a { margin-right: 14px; }
.notes p { white-space: pre-wrap; background: #f6f6f6; padding: 8px 12px;
           border-left: 3px solid #999; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; font-weight: 600; }
th.name, td.name { text-align: left; }
th[colspan] { text-align: center; }
.wide { overflow-x: auto; }
td.best { font-weight: 700; }
td.missing { color: #999; text-align: center; }
table.confusion td { min-width: 26px; text-align: center; }
table.confusion td.diagonal { outline: 2px solid #333; outline-offset: -2px; }
table.confusion th.column { writing-mode: vertical-rl; transform: rotate(180deg);
                            text-align: left; }
figure { margin: 16px 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; margin-top: 4px; }
details summary { cursor: pointer; margin: 8px 0; }
"""


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _format(value, digits: int = 2) -> str:
    """Counts as integers, metrics with ``digits`` decimals."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.{digits}f}"
    return str(value)


def _cell(
    value, *, classes: Sequence[str] = (), style: str = "", title: str = "", header=False
) -> str:
    """One escaped table cell; ``None`` shows as a dash."""
    tag = "th" if header else "td"
    classes = list(classes) + (["missing"] if value is None else [])
    attributes = "".join(
        f' {name}="{_escape(text)}"'
        for name, text in (("class", " ".join(classes)), ("style", style), ("title", title))
        if text
    )
    text = "–" if value is None else (value if isinstance(value, str) else _format(value))
    return f"<{tag}{attributes}>{_escape(text)}</{tag}>"


def _table(header_rows: Iterable[str], body_rows: Iterable[str], table_class: str = "") -> str:
    """A table from rendered rows (each the concatenated cells of one <tr>)."""
    class_attribute = f' class="{_escape(table_class)}"' if table_class else ""
    head = "".join(f"<tr>{row}</tr>" for row in header_rows)
    body = "".join(f"<tr>{row}</tr>" for row in body_rows)
    return f"<table{class_attribute}><thead>{head}</thead><tbody>{body}</tbody></table>"


def _level_order(level: str):
    """p2 < p3 < ... < p10, then any other names alphabetically."""
    match = re.fullmatch(r"p(\d+)", level)
    return (0, int(match.group(1)), "") if match else (1, 0, level)


def _method_order(method: str):
    methods = list(METHOD_TITLES)
    return (methods.index(method), "") if method in methods else (len(methods), method)


def _accuracy_section(accuracy: dict) -> str:
    summary_keys = [key for key in ACCURACY_TITLES if key in accuracy] + [
        key for key in accuracy if key not in ACCURACY_TITLES and not key.startswith("acc/")
    ]
    parts = ['<h2 id="accuracy">Accuracy</h2>']
    if summary_keys:
        parts.append(
            _table(
                [_cell("metric", header=True, classes=["name"]) + _cell("value", header=True)],
                [
                    _cell(ACCURACY_TITLES.get(key, key), classes=["name"]) + _cell(accuracy[key])
                    for key in summary_keys
                ],
            )
        )
    per_class = [
        (key[len("acc/") :], value) for key, value in accuracy.items() if key.startswith("acc/")
    ]
    if per_class:
        rows = []
        for name, value in per_class:
            # A bar behind the number makes weak classes stand out without a chart library.
            finite = isinstance(value, numbers.Real) and math.isfinite(value)
            percent = min(max(float(value), 0.0), 100.0) if finite else 0.0
            bar = (
                f"background: linear-gradient(90deg, #b9d7ee {percent:.1f}%,"
                f" transparent {percent:.1f}%)"
            )
            rows.append(_cell(name, classes=["name"]) + _cell(value, style=bar))
        parts.append("<h3>Per-class accuracy</h3>")
        parts.append(
            _table(
                [_cell("class", header=True, classes=["name"]) + _cell("accuracy %", header=True)],
                rows,
            )
        )
    return "\n".join(parts)


def _confusion_section(confusion_matrix: dict) -> str:
    names = list(confusion_matrix["class_names"])
    matrix = [list(row) for row in confusion_matrix["confusion_matrix"]]
    if len(matrix) != len(names) or any(len(row) != len(names) for row in matrix):
        raise ValueError(
            f"confusion matrix must be {len(names)} x {len(names)} for {len(names)} class names, "
            f"got rows of lengths {[len(row) for row in matrix]}"
        )
    header = (
        _cell("ground truth \\ prediction", header=True, classes=["name"])
        + "".join(_cell(name, header=True, classes=["column"]) for name in names)
        + _cell("images", header=True)
    )
    rows = []
    for i, (truth, counts) in enumerate(zip(names, matrix)):
        total = sum(counts)
        cells = [_cell(truth, header=True, classes=["name"])]
        for j, (predicted, count) in enumerate(zip(names, counts)):
            # Shade by the fraction of the row's images: rare classes read as well as common ones.
            fraction = count / total if total else 0.0
            text_colour = "#fff" if fraction > 0.55 else "#222"
            cells.append(
                _cell(
                    int(count),
                    classes=["diagonal"] if i == j else [],
                    style=f"background: rgba(33, 102, 172, {fraction:.3f}); color: {text_colour}",
                    title=f"{truth} predicted as {predicted}: {int(count)} of {total}"
                    f" ({100 * fraction:.1f}%)",
                )
            )
        cells.append(_cell(int(total)))
        rows.append("".join(cells))
    return "\n".join(
        [
            '<h2 id="confusion">Confusion matrix</h2>',
            "<p>Rows are ground truth, columns predictions; "
            "shading is the fraction of the row's images.</p>",
            _table([header], rows, table_class="confusion"),
        ]
    )


def explanation_metrics(rows: Sequence[dict]) -> list:
    """
    The columns for ``rows``: AD and IC at each budget found in them (top k % of each map's
    pixels, smallest k first: the coverage-fair headline), then the whole-map metrics.
    """
    columns = []
    for percent in table_budgets(rows):
        suffix = budget_suffix(percent)
        columns += [
            (f"average_drop{suffix}", f"Average Drop % ↓ (top {percent:g} %)",
             f"AD{percent:g} ↓", False),
            (f"increase_in_confidence{suffix}",
             f"Increase in Confidence % ↑ (top {percent:g} %)", f"IC{percent:g} ↑", True),
        ]
    return columns + EXPLANATION_METRICS


def _best_values(rows: Sequence[dict], metrics) -> dict:
    """For each metric, its best value over ``rows`` (ties all count as best)."""
    best = {}
    for key, _, _, higher_is_better in metrics:
        values = [row.get(key) for row in rows if isinstance(row.get(key), numbers.Real)]
        if values and higher_is_better is not None:
            best[key] = max(values) if higher_is_better else min(values)
    return best


def _metric_cell(row: dict, key: str, control: RandomControl, classes: Sequence[str] = ()) -> str:
    """A metric's cell, with :data:`CONTROL_MARK` when it does not beat the random control."""
    value = row.get(key)
    if control.not_beaten(row, key):
        return _cell(f"{_format(value)} {CONTROL_MARK}", classes=classes,
                     title="not below the random control's Average Drop")
    return _cell(value, classes=classes)


def _overall_table(rows: Sequence[dict], control: RandomControl) -> str:
    rows = sorted(rows, key=lambda row: _level_order(row["level"]))
    metrics = explanation_metrics(rows)
    best = _best_values(rows, metrics)
    header = (
        _cell("level", header=True, classes=["name"])
        + "".join(_cell(title, header=True) for _, title, _, _ in metrics)
        + _cell("images", header=True)
    )
    body = [
        _cell(row["level"], classes=["name"])
        + "".join(
            _metric_cell(row, key, control,
                         ["best"] if key in best and row.get(key) == best[key] else [])
            for key, _, _, _ in metrics
        )
        + _cell(row.get("num_images"))
        for row in rows
    ]
    return _table([header], body)


def _per_class_table(rows: Sequence[dict], control: RandomControl) -> str:
    """Rows = classes; for each level, the metrics that this method computed for some class."""
    classes = list(dict.fromkeys(row["class"] for row in rows))
    levels = sorted({row["level"] for row in rows}, key=_level_order)
    metrics = [m for m in explanation_metrics(rows)
               if any(row.get(m[0]) is not None for row in rows)]
    by_key = {(row["class"], row["level"]): row for row in rows}
    level_header = _cell("", header=True) + "".join(
        f'<th colspan="{len(metrics)}">{_escape(level)}</th>' for level in levels
    )
    metric_header = _cell("class", header=True, classes=["name"]) + "".join(
        _cell(short_title, header=True, title=title)
        for _ in levels
        for _, title, short_title, _ in metrics
    )
    body = [
        _cell(name, classes=["name"])
        + "".join(
            _metric_cell(by_key.get((name, level), {}), key, control)
            for level in levels
            for key, _, _, _ in metrics
        )
        for name in classes
    ]
    legend = ", ".join(f"{short_title.split()[0]} = {title}" for _, title, short_title, _ in metrics)
    table = _table([level_header, metric_header], body)
    return f'<p>{_escape(legend)}</p><div class="wide">{table}</div>'


MASK_DESCRIPTIONS = {
    "normalized": "E multiplies the normalised input, so masked pixels are the mean colour "
                  "(pytorch-grad-cam's and TorchCAM's convention)",
    "pixel": "E multiplies the raw pixels, so masked pixels are black",
}


def _explanation_section(explanation_rows: Sequence[dict], mask: Optional[str] = None,
                         budget_mode: Optional[str] = None) -> str:
    control = RandomControl(explanation_rows)
    parts = [
        '<h2 id="explanations">Explanation quality by pyramid level</h2>',
        "<p>Average Drop % and Deletion AUC: lower is better; Increase in Confidence % and "
        "Insertion AUC: higher is better. The best value of each column is bold. \"Top k %\" "
        "columns keep only each map's k % most salient pixels, so that maps of different "
        "coverage are compared on equal area: AD and IC of the whole map reward coverage.</p>",
    ]
    if mask:
        parts.append(f"<p>Mask convention: {_escape(mask)}: "
                     f"{_escape(MASK_DESCRIPTIONS.get(mask, ''))}.</p>")
    if budget_mode:
        budgets = describe_budgets(table_budgets(explanation_rows), budget_mode)
        parts.append(f"<p>Budgets: {_escape(budgets)}.</p>")
    if control:
        parts.append(f"<p>{_escape(CONTROL_NOTE)}</p>")
    for method in sorted({row["method"] for row in explanation_rows}, key=_method_order):
        method_rows = [row for row in explanation_rows if row["method"] == method]
        overall = [row for row in method_rows if row["class"] == "all"]
        per_class = [row for row in method_rows if row["class"] != "all"]
        method_title = _escape(METHOD_TITLES.get(method, method))
        parts.append(f"<h3>{method_title}</h3>")
        if overall:
            parts.append(_overall_table(overall, control))
        if per_class:
            # Collapsed: 21 classes per method would bury the per-level summary tables.
            parts.append(
                f"<details><summary>Per-class metrics, {method_title}</summary>"
                f"{_per_class_table(per_class, control)}</details>"
            )
    return "\n".join(parts)


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    mime = "image/png" if data.startswith(PNG_SIGNATURE) else mimetypes.guess_type(path)[0]
    if not mime or not mime.startswith("image/"):
        raise ValueError(f"not an image file: {path}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _images_section(images: Sequence[Tuple[str, str]]) -> str:
    figures = [
        f'<figure><img src="{_data_uri(path)}" alt="{_escape(caption)}">'
        f"<figcaption>{_escape(caption)}</figcaption></figure>"
        for caption, path in images
    ]
    return "\n".join(['<h2 id="heatmaps">Heatmaps</h2>'] + figures)


def render_html_report(
    *,
    title: str,
    accuracy: Optional[dict] = None,
    confusion_matrix: Optional[dict] = None,
    explanation_rows: Optional[Sequence[dict]] = None,
    images: Sequence[Tuple[str, str]] = (),
    notes: Union[None, str, Sequence[str]] = None,
    explanation_mask: Optional[str] = None,
    explanation_budget_mode: Optional[str] = None,
) -> str:
    """The report's HTML text; see :func:`write_html_report` for the arguments."""
    sections = []  # (anchor, navigation label, html)
    if notes:
        paragraphs = [notes] if isinstance(notes, str) else list(notes)
        sections.append(
            (
                None,
                None,
                '<div class="notes">'
                + "".join(f"<p>{_escape(p)}</p>" for p in paragraphs)
                + "</div>",
            )
        )
    if accuracy:
        sections.append(("accuracy", "Accuracy", _accuracy_section(accuracy)))
    if confusion_matrix:
        sections.append(("confusion", "Confusion matrix", _confusion_section(confusion_matrix)))
    if explanation_rows:
        sections.append(
            ("explanations", "Explanation quality",
             _explanation_section(explanation_rows, explanation_mask, explanation_budget_mode))
        )
    if images:
        sections.append(("heatmaps", "Heatmaps", _images_section(images)))
    navigation = " ".join(
        f'<a href="#{anchor}">{_escape(label)}</a>' for anchor, label, _ in sections if anchor
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_escape(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_escape(title)}</h1>",
            f"<nav>{navigation}</nav>",
        ]
        + [body for _, _, body in sections]
        + ["</body>", "</html>", ""]
    )


def write_html_report(
    path: str,
    *,
    title: str,
    accuracy: Optional[dict] = None,
    confusion_matrix: Optional[dict] = None,
    explanation_rows: Optional[Sequence[dict]] = None,
    images: Sequence[Tuple[str, str]] = (),
    notes: Union[None, str, Sequence[str]] = None,
    explanation_mask: Optional[str] = None,
    explanation_budget_mode: Optional[str] = None,
) -> None:
    """
    Write one self-contained HTML report atomically (a reader never sees a half-written page).

    Args:
        path: the ``.html`` file to write; its directory must exist.
        title: page title and heading.
        accuracy: ClassificationEvaluator results: ``top1``, ``top5``, ``mean_class_acc`` and
            ``acc/<class>`` in percent; other keys are listed with the summary.
        confusion_matrix: ``confusion_matrix.json`` of ClassificationEvaluator: ``{"class_names": [...],
            "confusion_matrix": [[int]]}``, rows = ground truth.
        explanation_rows: rows of ``explanation_metrics.json`` (method, level, class, metrics).
        images: ``(caption, image_path)`` pairs, e.g. heatmap grid PNGs; each is embedded.
        notes: a paragraph or a list of paragraphs shown under the title (config, checkpoint, ...).
        explanation_mask: the mask convention the explanation rows were measured with.
        explanation_budget_mode: their budget mode ("binary" or "valued").
    Sections whose argument is None or empty are left out.
    """
    text = render_html_report(
        title=title,
        accuracy=accuracy,
        confusion_matrix=confusion_matrix,
        explanation_rows=explanation_rows,
        images=images,
        notes=notes,
        explanation_mask=explanation_mask,
        explanation_budget_mode=explanation_budget_mode,
    )
    atomic_write_text(path, text)


def write_evaluation_report(
    path: str,
    *,
    dataset_name: str,
    results: Optional[dict] = None,
    inference_dir: Optional[str] = None,
    explain_dir: Optional[str] = None,
    notes: Union[None, str, Sequence[str]] = None,
) -> None:
    """
    The report of one evaluation, assembled from what the evaluators wrote: ``results`` (the
    evaluators' dict, e.g. ``{"classification": {...}}``), ``confusion_matrix.json`` in
    ``inference_dir``, and ``explanation_metrics.json`` plus ``grid_*.png`` in ``explain_dir``.
    Missing parts are left out.
    """
    confusion_path = os.path.join(inference_dir or "", "confusion_matrix.json")
    metrics_path = os.path.join(explain_dir or "", "explanation_metrics.json")
    confusion = _read_json(confusion_path) if inference_dir else None
    explanation = _read_json(metrics_path) if explain_dir else None
    grids = sorted(glob.glob(os.path.join(explain_dir, "grid_*.png"))) if explain_dir else []
    write_html_report(
        path,
        title=f"fal_d2 evaluation on {dataset_name}",
        accuracy=(results or {}).get("classification"),
        confusion_matrix=confusion,
        explanation_rows=explanation["rows"] if explanation else None,
        images=[(f"Heatmaps: {os.path.basename(p)[len('grid_'):-len('.png')]}", p) for p in grids],
        notes=notes,
        explanation_mask=explanation.get("mask") if explanation else None,
        explanation_budget_mode=table_budget_mode(explanation) if explanation else None,
    )


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
