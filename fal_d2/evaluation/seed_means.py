"""Means over seeds as fal_d2's tables print them: the mean, and half the range after "±".

One place for tools/gpu_reproduce.py's comparison and tools/aggregate_explanations.py, so that
both report repeated runs the same way.
"""
from typing import Iterable, Optional, Tuple

__all__ = ["mean_half_range", "format_mean"]


def mean_half_range(values: Iterable[Optional[float]]) -> Optional[Tuple[float, float, int]]:
    """(mean, half the range, count) of the values that are not None; None when there are none."""
    kept = [float(value) for value in values if value is not None]
    if not kept:
        return None
    return sum(kept) / len(kept), (max(kept) - min(kept)) / 2, len(kept)


def format_mean(values: Iterable[Optional[float]], digits: int = 1) -> str:
    """"mean ± half range" (the ± part only with two values or more); "–" without values."""
    summary = mean_half_range(values)
    if summary is None:
        return "–"
    mean, half, count = summary
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if count > 1 else "")
