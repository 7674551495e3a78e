"""Choosing the FPN levels that get attention branches, from a baseline's explanation metrics.

The paper's method: explain every level of a plain FPN classifier, then put attention branches on
the levels whose explanations are weakest. "Weakest" is made a rule here so that it is repeatable:

* keep the rows of one saliency method (default Grad-CAM; ``branch_cam`` ranks a FAL model's own
  class maps) and one class (default "all");
* take AD and IC of the whole map, or at a budget (the map's top k % of pixels), which compares
  levels whose maps cover different areas fairly: AD and IC reward coverage;
* rank levels by lowest Increase in Confidence %, ties broken by highest Average Drop %, then by
  pyramid order (p2 before p3) so that the ranking never depends on the table's row order;
* select either the ``count`` weakest levels, or every level whose Increase in Confidence is at
  most ``max_increase``.

Rows follow the ``explanation_metrics.json`` contract: dicts with ``method``, ``level``, ``class``,
``average_drop``, ``increase_in_confidence`` and ``num_images`` (other keys are ignored).
"""

import json
import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .budgets import budget_suffix, table_budgets

__all__ = [
    "DEFAULT_COUNT",
    "LevelSelectionError",
    "LevelScore",
    "load_explanation_rows",
    "rank_levels",
    "select_weakest_levels",
]

# Detectron2 names FPN outputs "p<stage>": p2-p5 from ResNet stages, p6/p7 from top blocks.
FPN_LEVEL_PATTERN = re.compile(r"p[2-7]")
DEFAULT_COUNT = 2  # the paper's choice: attention branches on its two weakest levels, p2 and p3


class LevelSelectionError(ValueError):
    """A problem with the metrics table or the selection rule; its message is one line for a CLI."""


@dataclass(frozen=True)
class LevelScore:
    """One level's explanation quality for the chosen method and class."""

    level: str
    increase_in_confidence: float
    average_drop: float
    num_images: Optional[int]


def load_explanation_rows(path: str) -> List[dict]:
    """Read an ``explanation_metrics.json`` file: ``{"rows": [...]}`` or a bare list of rows."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise LevelSelectionError(f"metrics file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LevelSelectionError(f"malformed JSON in {path}: {e}") from None
    rows = content.get("rows") if isinstance(content, dict) else content
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise LevelSelectionError(
            f"{path}: expected a list of row objects or an object with a 'rows' list"
        )
    return rows


def _metric(row: dict, key: str) -> float:
    value = row.get(key)
    # bool is an int subclass; a JSON true/false here is a producer bug, not a score.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LevelSelectionError(
            f"level {row.get('level')!r}: '{key}' must be a finite number, got {value!r}"
        )
    return float(value)


def _pyramid_order(level: str) -> int:
    return int(level[1:])


def rank_levels(
    rows: Sequence[dict], method: str = "gradcam", class_name: str = "all",
    budget: Optional[float] = None,
) -> List[LevelScore]:
    """
    All levels of ``method`` and ``class_name``, weakest explanation first (see module doc), by
    AD and IC of the whole map (``budget`` None or 100) or of its top ``budget`` % of pixels.
    """
    suffix = "" if budget is None else budget_suffix(budget)
    increase_key, drop_key = f"increase_in_confidence{suffix}", f"average_drop{suffix}"
    if budget not in (None, 100) and budget not in table_budgets(rows):
        raise LevelSelectionError(
            f"the table has no AD/IC at the top {budget:g} % of pixels (budgets it has: "
            f"{[f'{b:g}' for b in table_budgets(rows)]}); re-run tools/explain.py with "
            f"--budgets {budget:g}"
        )
    selected = [
        row for row in rows if row.get("method") == method and row.get("class") == class_name
    ]
    if not selected:
        methods = sorted({str(row.get("method")) for row in rows})
        if method not in methods:
            raise LevelSelectionError(
                f"no rows for method {method!r}; the table has methods {methods}"
            )
        classes = sorted({str(row.get("class")) for row in rows if row.get("method") == method})
        raise LevelSelectionError(
            f"no rows for method {method!r} and class {class_name!r}; "
            f"that method has classes {classes}"
        )

    scores = {}
    for row in selected:
        level = row.get("level")
        if not isinstance(level, str) or not FPN_LEVEL_PATTERN.fullmatch(level):
            raise LevelSelectionError(
                f"bad level name {level!r} in the table; expected FPN level names p2 ... p7"
            )
        if level in scores:
            raise LevelSelectionError(
                f"more than one row for method {method!r}, class {class_name!r}, level {level!r}"
            )
        scores[level] = LevelScore(
            level=level,
            increase_in_confidence=_metric(row, increase_key),
            average_drop=_metric(row, drop_key),
            num_images=row.get("num_images"),
        )
    return sorted(
        scores.values(),
        key=lambda s: (s.increase_in_confidence, -s.average_drop, _pyramid_order(s.level)),
    )


def select_weakest_levels(
    rows: Sequence[dict],
    method: str = "gradcam",
    class_name: str = "all",
    count: Optional[int] = None,
    max_increase: Optional[float] = None,
    budget: Optional[float] = None,
) -> List[str]:
    """
    The levels that should get attention branches, in pyramid order (as a config lists them).

    Args:
        count: select this many of the weakest levels (``DEFAULT_COUNT`` when no rule is given).
        max_increase: instead, select every level whose Increase in Confidence % is at most this.
        budget: rank by AD and IC at this budget (see :func:`rank_levels`).
    """
    if count is not None and max_increase is not None:
        raise LevelSelectionError("give either count or max_increase, not both")
    if max_increase is not None and not math.isfinite(max_increase):
        raise LevelSelectionError(f"max_increase must be a finite number, got {max_increase!r}")
    ranking = rank_levels(rows, method, class_name, budget)
    if max_increase is not None:
        chosen = [s for s in ranking if s.increase_in_confidence <= max_increase]
        if not chosen:
            raise LevelSelectionError(
                f"no level has Increase in Confidence <= {max_increase:g}; the lowest is "
                f"{ranking[0].increase_in_confidence:g} ({ranking[0].level})"
            )
    else:
        count = DEFAULT_COUNT if count is None else count
        if not 1 <= count <= len(ranking):
            raise LevelSelectionError(
                f"count must be between 1 and the {len(ranking)} level(s) in the table, got {count}"
            )
        chosen = ranking[:count]
    return sorted((s.level for s in chosen), key=_pyramid_order)
