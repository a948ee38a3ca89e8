"""Checks shared by the loss configs."""

from __future__ import annotations

from typing import Any

from jsdr.config import check


def check_chunk(value: Any) -> None:
    """chunk_size: a positive int (positions per lm-head chunk) or None (one chunk)."""
    check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), "chunk_size",
          f"{value!r} must be a positive int (positions per lm-head chunk) or None (one chunk)")


def check_number(value: Any, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    """A real number in the interval given by lo/hi (open or closed ends)."""
    check(not isinstance(value, bool) and isinstance(value, (int, float)), key, f"{value!r} must be a number")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    check(not bad, key, f"{value!r} must be in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}")
