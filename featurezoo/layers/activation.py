"""Activations that MindCV defines as cells of its own (kept for their module tree)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Swish"]


class Swish(nn.Module):
    """``x * sigmoid(x)`` (SiLU), as MindCV's ``layers.Swish``, with its ``sigmoid`` child."""

    def __init__(self):
        super().__init__()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel: one pass and no temporary (x * sigmoid(x) costs three).
        return F.silu(x)
