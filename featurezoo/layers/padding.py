"""MindSpore's ``pad_mode`` semantics for convolution and pooling.

MindSpore's ``pad_mode="same"`` gives ``ceil(size / stride)`` outputs and puts
the odd pixel of padding at the bottom/right, unlike PyTorch's symmetric
``padding``. Matching MindCV's numbers needs the same windows, so the padding
is computed per input size; where it happens to be symmetric the fast
built-in padding is used instead of an explicit pad.

The size-dependent computations are module-level functions registered with
``torch.fx.wrap``: ``torch.fx.symbolic_trace`` records them as single calls
instead of failing on Python arithmetic over a traced shape, and
``torch.jit.trace`` / ``torch.export`` trace through them (shapes are static
there).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["same_pad", "pad2d", "Conv2d", "MaxPool2d", "AvgPool2d", "PAD_MODES", "conv2d_same", "max_pool2d_ms",
           "avg_pool2d_ms"]

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
            return conv2d_same(x, self.weight, self.bias, self.stride, self.dilation, self.groups)
        return super().forward(x)


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                dilation: Tuple[int, int], groups: int) -> torch.Tensor:
    """A convolution with MindSpore's ``same`` padding for this input's size."""
    h, w = x.shape[-2], x.shape[-1]
    (pt, pb), (pl, pr) = (same_pad(h, weight.shape[-2], stride[0], dilation[0]),
                          same_pad(w, weight.shape[-1], stride[1], dilation[1]))
    if pt == pb and pl == pr:
        return F.conv2d(x, weight, bias, stride, (pt, pl), dilation, groups)
    # Asymmetric (stride 2 on an even size: one more row/column at the bottom/right). Padding a copy of
    # the input costs a depthwise conv two to three times over; instead pad symmetrically by `before`
    # plus whole strides, enough for the bottom/right too, so the windows start where MindSpore's do,
    # and drop the leading windows: the same sums, in one call, at a few percent of extra outputs.
    (top, skip_h), (left, skip_w) = _widened(pt, pb, stride[0]), _widened(pl, pr, stride[1])
    y = F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return y[:, :, skip_h:skip_h + math.ceil(h / stride[0]), skip_w:skip_w + math.ceil(w / stride[1])]


def _widened(before: int, after: int, stride: int) -> Tuple[int, int]:
    """Symmetric padding >= ``after`` whose windows start at ``-before`` plus whole strides, and the
    number of leading windows to drop: ``(before + stride * skip, skip)``."""
    skip = -(-(after - before) // stride) if after > before else 0
    return before + stride * skip, skip


torch.fx.wrap("conv2d_same")


def _pool_pads(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int], pad_mode: str,
               padding: Tuple[int, int]) -> List[Tuple[int, int]]:
    if pad_mode == "same":
        return [same_pad(x.shape[-2 + i], kernel[i], stride[i]) for i in range(2)]
    if pad_mode == "pad":
        return [(p, p) for p in padding]
    return [(0, 0), (0, 0)]


def _ceil_adds_one(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int], pt: int, pl: int, pb: int,
                   pr: int) -> bool:
    for i, (lo, hi) in enumerate(((pt, pb), (pl, pr))):
        size, k, s = x.shape[-2 + i], kernel[i], stride[i]
        want = (size + lo + hi - k) // s + 1
        got = math.ceil((size + 2 * lo - k) / s) + 1
        if (got - 1) * s >= size + lo:  # PyTorch drops a last window that starts in the padding
            got -= 1
        if lo * 2 > k or got != want:
            return False
    return True


def max_pool2d_ms(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int], pad_mode: str,
                  padding: Tuple[int, int]) -> torch.Tensor:
    """Max pooling with MindSpore's ``pad_mode``; padding never wins the max."""
    (pt, pb), (pl, pr) = _pool_pads(x, kernel, stride, pad_mode, padding)
    if pt == pb and pl == pr:
        return F.max_pool2d(x, kernel, stride, (pt, pl))
    # Only the bottom/right get one more row: ceil_mode adds exactly that window.
    if (pb - pt, pr - pl) in ((1, 1), (1, 0), (0, 1)) and _ceil_adds_one(x, kernel, stride, pt, pl, pb, pr):
        return F.max_pool2d(x, kernel, stride, (pt, pl), ceil_mode=True)
    x = pad2d(x, pl, pr, pt, pb, value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


def avg_pool2d_ms(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int], pad_mode: str,
                  padding: Tuple[int, int]) -> torch.Tensor:
    """Average pooling with MindSpore's ``pad_mode``; padded cells are not counted."""
    (pt, pb), (pl, pr) = _pool_pads(x, kernel, stride, pad_mode, padding)
    if pt == pb and pl == pr and 2 * pt <= kernel[0] and 2 * pl <= kernel[1]:
        return F.avg_pool2d(x, kernel, stride, (pt, pl), count_include_pad=False)
    ones = torch.ones_like(x[:1, :1])
    x, ones = F.pad(x, (pl, pr, pt, pb)), F.pad(ones, (pl, pr, pt, pb))
    return F.avg_pool2d(x, kernel, stride) / F.avg_pool2d(ones, kernel, stride)


torch.fx.wrap("max_pool2d_ms")
torch.fx.wrap("avg_pool2d_ms")


class _Pool2d(nn.Module):
    def __init__(self, kernel_size: _Int2 = 1, stride: _Int2 = 1, pad_mode: str = "valid", padding: _Int2 = 0):
        super().__init__()
        self.pad_mode = _check_pad_mode(pad_mode, padding)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pad_mode={self.pad_mode!r}"


class MaxPool2d(_Pool2d):
    """Max pooling with MindSpore's ``pad_mode``; padding never wins the max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d_ms(x, self.kernel_size, self.stride, self.pad_mode, self.padding)


class AvgPool2d(_Pool2d):
    """Average pooling with MindSpore's ``pad_mode``; padded cells are not counted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2d_ms(x, self.kernel_size, self.stride, self.pad_mode, self.padding)
