"""Small numeric helpers shared by model families."""
from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn

from .padding import AvgPool2d, MaxPool2d

__all__ = ["make_divisible", "total_stride"]


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


_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, MaxPool2d, AvgPool2d)


def total_stride(*modules: nn.Module) -> int:
    """The stride of ``modules`` run one after the other: the product of the strides of the
    convolutions and poolings in them, so ``feature_info`` reductions follow the layers built.

    Only for chains (stems, pools, transitions): a block with a strided shortcut beside its
    strided conv would count both.

    >>> total_stride(nn.Conv2d(3, 8, 3, stride=2), nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(3, 2)))
    4
    """
    strides = (m.stride for module in modules for m in module.modules() if isinstance(m, _STRIDED))
    return math.prod(s if isinstance(s, int) else s[0] for s in strides)
