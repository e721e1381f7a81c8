"""Stochastic depth as MindCV's ``DropPath``, with its module tree (a ``dropout`` child).

`Deep Networks with Stochastic Depth <https://arxiv.org/abs/1603.09382>`_: in
training, each sample's residual branch is zeroed with probability
``drop_prob`` (and the survivors scaled by ``1 / keep_prob`` if
``scale_by_keep``); in eval it is the identity.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DropPath"]


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1), got {drop_prob!r}")
        self.keep_prob = 1.0 - drop_prob
        self.scale_by_keep = scale_by_keep
        # MindCV draws the per-sample mask with a Dropout cell, which already scales by 1 / keep_prob.
        self.dropout = nn.Dropout(p=drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_prob == 1.0 or not self.training:
            return x
        mask = self.dropout(x.new_ones((x.shape[0],) + (1,) * (x.ndim - 1)))
        if not self.scale_by_keep:
            mask = mask * self.keep_prob
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={1.0 - self.keep_prob:g}, scale_by_keep={self.scale_by_keep}"
