"""How budgeted metrics are named: AD and IC with only each map's top k % of pixels kept.

One place for the row keys (``average_drop_top15``...) that the evaluator writes and that the
report, level selection and tools read back, and for how a table names its budgets and budget
mode, so that writer and readers cannot drift apart.
"""
import re
from typing import List, Sequence

from fal_d2.explain.metrics import BUDGET_MODES

__all__ = [
    "LEGACY_BUDGET_MODE",
    "budget_suffix",
    "budget_metrics",
    "check_budget_mode",
    "check_budgets",
    "describe_budgets",
    "table_budget_mode",
    "table_budgets",
]

BUDGETED = ("average_drop", "increase_in_confidence")
_BUDGET_KEY = re.compile(r"increase_in_confidence_top([0-9.]+)")
# What a budget does with the pixels it keeps, as tables and reports say it.
BUDGET_MODE_NOTES = {"binary": "kept pixels at 1", "valued": "kept pixels at their map values"}
# Tables written before the mode was recorded kept pixels at their values.
LEGACY_BUDGET_MODE = "valued"


def budget_suffix(percent: float) -> str:
    """Row-key suffix of a budget: "_top15" for the top 15 % of pixels; "" for 100 % (the whole
    map has the plain columns)."""
    return "" if percent == 100 else f"_top{percent:g}"


def budget_metrics(budgets: Sequence[float]) -> List[str]:
    """Row keys of the budgeted metrics, budget by budget."""
    return [f"{metric}{budget_suffix(percent)}" for percent in budgets for metric in BUDGETED]


def check_budgets(budgets: Sequence[float]) -> List[float]:
    """The budgets below 100 % in increasing order (100 % is the whole map: the plain columns)."""
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, float))
           or not 0 < b <= 100]
    if bad:
        raise ValueError(f"TEST.EXPLAIN.BUDGETS: {bad} outside (0, 100]; budgets are percentages "
                         f"of each map's most salient pixels, e.g. [15, 50]")
    return sorted({float(b) for b in budgets if b < 100})


def check_budget_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`fal_d2.explain.metrics.BUDGET_MODES`."""
    if mode not in BUDGET_MODES:
        raise ValueError(f"TEST.EXPLAIN.BUDGET_MODE={mode!r}; expected one of {BUDGET_MODES}")
    return mode


def table_budgets(rows: Sequence[dict]) -> List[float]:
    """The budgets that a table's rows have AD and IC columns for, in increasing order."""
    return sorted({float(m.group(1)) for row in rows for key in row
                   if (m := _BUDGET_KEY.fullmatch(key))})


def table_budget_mode(table: dict) -> str:
    """The budget mode of an ``explanation_metrics.json`` or ``layer_analysis.json`` object."""
    return table.get("budget_mode", LEGACY_BUDGET_MODE)


def describe_budgets(budgets: Sequence[float], mode: str) -> str:
    """E.g. "top 15, 50 % of each map's pixels (binary: kept pixels at 1)"."""
    if not budgets:
        return "none"
    percents = ", ".join(f"{percent:g}" for percent in budgets)
    return f"top {percents} % of each map's pixels ({mode}: {BUDGET_MODE_NOTES[mode]})"
