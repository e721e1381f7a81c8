"""Activations that MindCV defines as cells of its own (kept for their module tree), and
MindSpore's default GELU (the tanh approximation) computed faster on CPU.

Layer: part of :mod:`featurezoo.layers`; imports torch only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Swish", "GELU", "gelu_tanh"]

# 0.5 * (1 + tanh(z)) = sigmoid(2 z): the tanh GELU is x * sigmoid(x * (A + B x^2)).
_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_B = _GELU_A * 0.044715
# Elements per pass: a chunk of the input and the temporary (2 x 512 KiB) stay in a core's L2 cache.
_GELU_CHUNK = 1 << 17


class Swish(nn.Module):
    """``x * sigmoid(x)`` (SiLU), as MindCV's ``layers.Swish``, with its ``sigmoid`` child.

    ``inplace=True`` overwrites the input (no new tensor: less memory, and on CPU
    no fresh pages to fault in); only for an input nothing else reads, such as a
    norm's output inside a block.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel: one pass and no temporary (x * sigmoid(x) costs three).
        return F.silu(x, inplace=self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


def gelu_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` (MindSpore's default GELU), the same function.

    ATen's tanh GELU on CPU costs about twice its exact GELU (torch 2.14; a fifth of
    ConvNeXt-T's forward). For a float32 CPU tensor that needs no gradient this
    computes ``x * sigmoid(x * (A + B x^2))``, equal to it up to rounding (a few
    1e-7 of the largest value), in chunks that stay in a core's L2 cache, so its
    passes read memory once; ``inplace=True`` writes into ``x`` (no new tensor: on
    CPU its fresh pages cost as much as the arithmetic). Anything else (autograd,
    other dtypes or devices, tracing, compiling, exporting) gets ``F.gelu``, which
    those understand, and a new tensor.
    """
    if (type(x) is not torch.Tensor or x.dtype != torch.float32 or x.device.type != "cpu"
            or (x.requires_grad and torch.is_grad_enabled()) or not x.is_contiguous()
            or x.numel() < _GELU_CHUNK or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return F.gelu(x, approximate="tanh")
    out = x if inplace else torch.empty_like(x)
    src, dst = x.view(-1), out.view(-1)
    tmp = torch.empty(_GELU_CHUNK, dtype=x.dtype)
    for start in range(0, src.numel(), _GELU_CHUNK):
        xs = src[start:start + _GELU_CHUNK]
        t = tmp[:xs.numel()]
        torch.mul(xs, xs, out=t)
        t.mul_(_GELU_B).add_(_GELU_A).mul_(xs).sigmoid_()
        torch.mul(xs, t, out=dst[start:start + _GELU_CHUNK])
    return out


torch.fx.wrap("gelu_tanh")


class GELU(nn.GELU):
    """``nn.GELU`` whose tanh approximation (MindSpore's default) runs :func:`gelu_tanh`;
    ``inplace=True`` lets it overwrite its input (only for an input nothing else reads)."""

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__(approximate=approximate)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh":
            return gelu_tanh(x, self.inplace)
        return F.gelu(x)
