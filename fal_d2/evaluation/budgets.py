"""How budgeted metrics are named: AD and IC with only each map's top k % of pixels kept.

One place for the row keys (``average_drop_top15``...) that the evaluator writes and that the
report, level selection and tools read back, so that writer and readers cannot drift apart.
"""
import re
from typing import List, Sequence

__all__ = ["budget_suffix", "budget_metrics", "check_budgets", "table_budgets"]

BUDGETED = ("average_drop", "increase_in_confidence")
_BUDGET_KEY = re.compile(r"increase_in_confidence_top([0-9.]+)")


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


def table_budgets(rows: Sequence[dict]) -> List[float]:
    """The budgets that a table's rows have AD and IC columns for, in increasing order."""
    return sorted({float(m.group(1)) for row in rows for key in row
                   if (m := _BUDGET_KEY.fullmatch(key))})
