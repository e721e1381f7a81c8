"""Activations that MindCV defines as cells of its own (kept for their module tree)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Swish"]


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
