"""Small numeric helpers shared by model families."""
from __future__ import annotations

from typing import Optional

__all__ = ["make_divisible"]


def make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` (at least ``min_value``), as MindCV's
    ``helpers.make_divisible``: nearest multiple, bumped up one step if rounding
    lost more than 10% of ``v``.

    >>> make_divisible(16 * 0.75, 8), make_divisible(72 * 0.35, 8), make_divisible(4, 8)
    (16, 24, 8)
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v
