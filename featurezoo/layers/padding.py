"""MindSpore's ``pad_mode`` semantics for convolution and pooling.

MindSpore's ``pad_mode="same"`` gives ``ceil(size / stride)`` outputs and puts
the odd pixel of padding at the bottom/right, unlike PyTorch's symmetric
``padding``. Matching MindCV's numbers needs the same windows, so the padding
is computed per input size; where it happens to be symmetric the fast
built-in padding is used instead of an explicit pad.
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["same_pad", "pad2d", "Conv2d", "MaxPool2d", "AvgPool2d", "PAD_MODES"]

PAD_MODES = ("same", "valid", "pad")
_Int2 = Union[int, Tuple[int, int]]


def _pair(v: _Int2) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """(before, after) padding of MindSpore's ``same`` mode along one axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad2d(x: torch.Tensor, left: int, right: int, top: int, bottom: int, value: float = 0.0) -> torch.Tensor:
    """``F.pad`` for non-negative padding that fills only the border: F.pad fills the
    whole new tensor before copying, which costs a depthwise conv as much again."""
    n, c, h, w = x.shape
    out = x.new_empty((n, c, h + top + bottom, w + left + right))
    out[:, :, top:top + h, left:left + w] = x
    for rows in (slice(0, top), slice(top + h, None)):
        out[:, :, rows, :].fill_(value)
    for cols in (slice(0, left), slice(left + w, None)):
        out[:, :, top:top + h, cols].fill_(value)
    return out


def _check_pad_mode(pad_mode: str, padding: _Int2) -> str:
    pad_mode = pad_mode.lower()
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r}; valid: {list(PAD_MODES)}")
    if pad_mode != "pad" and padding not in (0, (0, 0)):
        raise ValueError(f"padding={padding!r} needs pad_mode='pad' (MindSpore semantics), got pad_mode={pad_mode!r}")
    return pad_mode


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with MindSpore's ``pad_mode`` (``same``/``valid``/``pad``).

    Defaults follow MindSpore's ``nn.Conv2d``: ``pad_mode="same"`` and no bias,
    so a MindCV layer translates argument for argument. Parameter names stay
    ``weight``/``bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Int2, stride: _Int2 = 1,
                 pad_mode: str = "same", padding: _Int2 = 0, dilation: _Int2 = 1, group: int = 1,
                 has_bias: bool = False):
        self.pad_mode = _check_pad_mode(pad_mode, padding)
        k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
        static: _Int2 = padding if self.pad_mode == "pad" else 0
        self._dynamic = False
        if self.pad_mode == "same":
            # With stride 1 the padding does not depend on the input size.
            if s == (1, 1) and all((ki - 1) * di % 2 == 0 for ki, di in zip(k, d)):
                static = tuple((ki - 1) * di // 2 for ki, di in zip(k, d))
            else:
                self._dynamic = True
        super().__init__(in_channels, out_channels, k, s, static, d, group, has_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dynamic:
            (pt, pb), (pl, pr) = (same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0]),
                                  same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1]))
            if pt == pb and pl == pr:
                return F.conv2d(x, self.weight, self.bias, self.stride, (pt, pl), self.dilation, self.groups)
            x = pad2d(x, pl, pr, pt, pb)
        return super().forward(x)


class _Pool2d(nn.Module):
    def __init__(self, kernel_size: _Int2 = 1, stride: _Int2 = 1, pad_mode: str = "valid", padding: _Int2 = 0):
        super().__init__()
        self.pad_mode = _check_pad_mode(pad_mode, padding)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)

    def _pads(self, x: torch.Tensor) -> List[Tuple[int, int]]:
        if self.pad_mode == "same":
            return [same_pad(x.shape[-2 + i], self.kernel_size[i], self.stride[i]) for i in range(2)]
        if self.pad_mode == "pad":
            return [(p, p) for p in self.padding]
        return [(0, 0), (0, 0)]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pad_mode={self.pad_mode!r}"


class MaxPool2d(_Pool2d):
    """Max pooling with MindSpore's ``pad_mode``; padding never wins the max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pt, pb), (pl, pr) = self._pads(x)
        if pt == pb and pl == pr:
            return F.max_pool2d(x, self.kernel_size, self.stride, (pt, pl))
        # Only the bottom/right get one more row: ceil_mode adds exactly that window.
        if (pb - pt, pr - pl) in ((1, 1), (1, 0), (0, 1)) and self._ceil_adds_one(x, pt, pl, pb, pr):
            return F.max_pool2d(x, self.kernel_size, self.stride, (pt, pl), ceil_mode=True)
        x = pad2d(x, pl, pr, pt, pb, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def _ceil_adds_one(self, x: torch.Tensor, pt: int, pl: int, pb: int, pr: int) -> bool:
        for i, (lo, hi) in enumerate(((pt, pb), (pl, pr))):
            size, k, s = x.shape[-2 + i], self.kernel_size[i], self.stride[i]
            want = (size + lo + hi - k) // s + 1
            got = math.ceil((size + 2 * lo - k) / s) + 1
            if (got - 1) * s >= size + lo:  # PyTorch drops a last window that starts in the padding
                got -= 1
            if lo * 2 > k or got != want:
                return False
        return True


class AvgPool2d(_Pool2d):
    """Average pooling with MindSpore's ``pad_mode``; padded cells are not counted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pt, pb), (pl, pr) = self._pads(x)
        if pt == pb and pl == pr and 2 * pt <= self.kernel_size[0] and 2 * pl <= self.kernel_size[1]:
            return F.avg_pool2d(x, self.kernel_size, self.stride, (pt, pl), count_include_pad=False)
        ones = torch.ones_like(x[:1, :1])
        x, ones = F.pad(x, (pl, pr, pt, pb)), F.pad(ones, (pl, pr, pt, pb))
        return F.avg_pool2d(x, self.kernel_size, self.stride) / F.avg_pool2d(ones, self.kernel_size, self.stride)
