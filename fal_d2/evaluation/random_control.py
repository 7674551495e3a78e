"""Which rows of an explanation table do not beat the random control map.

The "random" method (:class:`fal_d2.explain.RandomSaliency`) explains nothing; a map whose Average
Drop at a budget is not lower than the random map's, for the same model, level and class, ranks
pixels no better than chance. Tables and the HTML report mark such values with
:data:`CONTROL_MARK` and explain the mark with :data:`CONTROL_NOTE`.
"""
import numbers
from typing import Sequence

from .budgets import budget_suffix, table_budgets

__all__ = ["CONTROL_MARK", "CONTROL_NOTE", "RANDOM_METHOD", "RandomControl"]

RANDOM_METHOD = "random"  # its name in fal_d2.explain.SALIENCY_METHODS
CONTROL_MARK = "†"
CONTROL_NOTE = (f"{CONTROL_MARK}: Average Drop at this budget not below the random control's "
                f"(method '{RANDOM_METHOD}', same model, level and class): the map ranks pixels "
                f"no better than a smooth random map.")


def _row_key(row: dict):
    return row.get("model"), row.get("level"), row.get("class")


class RandomControl:
    """The random control's rows of a table, to test other rows' budgeted Average Drops against.
    False (as a bool) when the table has no random rows: nothing is marked then."""

    def __init__(self, rows: Sequence[dict]):
        self._controls = {_row_key(row): row for row in rows if row.get("method") == RANDOM_METHOD}
        self.keys = {f"average_drop{budget_suffix(percent)}" for percent in table_budgets(rows)}

    def __bool__(self):
        return bool(self._controls)

    def not_beaten(self, row: dict, key: str) -> bool:
        """Whether ``row``'s ``key`` (a budgeted Average Drop) is not below the random map's."""
        if key not in self.keys or row.get("method") == RANDOM_METHOD:
            return False
        ours = row.get(key)
        control = self._controls.get(_row_key(row), {}).get(key)
        return all(isinstance(value, numbers.Real) for value in (ours, control)) and ours >= control
