"""The transformer MLP most of MindCV's transformer families share: fc1, GELU, fc2.

MindCV writes it once per family (vit, pit, pvt, swin, crossvit, volo, xcit,
coat); the parameter names (``fc1``, ``fc2``) and the dropout placement are
the same everywhere; only the GELU differs (MindSpore's default is the tanh
approximation, CoAT asks for the exact one).

Layer: part of :mod:`featurezoo.layers`; imports torch and :mod:`.activation` only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .activation import GELU

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (``gelu_approximate``: ``"tanh"``, MindSpore's
    default, or ``"none"``, the exact GELU)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, gelu_approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = GELU(approximate=gelu_approximate, inplace=True)  # on fc1's fresh output
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
