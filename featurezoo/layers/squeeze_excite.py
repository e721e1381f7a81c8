"""Squeeze-and-Excitation with 1x1 convolutions, as MindCV's ``layers.SqueezeExcite``.

`Squeeze-and-Excitation Networks <https://arxiv.org/abs/1709.01507>`_. Module
and parameter names follow MindCV (``conv_reduce``, optional ``bn``,
``conv_expand``), so its checkpoints map one to one.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .helpers import make_divisible
from .pooling import GlobalAvgPooling

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Channel gate ``x * gate(conv_expand(act(conv_reduce(mean_hw(x)))))``.

    Args:
        in_channels: channels of ``x``.
        rd_ratio: reduced channels as a fraction of ``in_channels`` (rounded
            with :func:`make_divisible` to ``rd_divisor``), unless ``rd_channels``.
        rd_channels: reduced channels, given directly.
        norm: optional normalisation class applied after ``conv_reduce`` (``bn``).
        act_layer, gate_layer: activation classes (MindCV's defaults ReLU, Sigmoid).
    """

    def __init__(self, in_channels: int, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 8, norm: Optional[Callable[[int], nn.Module]] = None,
                 act_layer: Callable[[], nn.Module] = nn.ReLU, gate_layer: Callable[[], nn.Module] = nn.Sigmoid):
        super().__init__()
        self.norm = norm
        self.act = act_layer()
        self.gate = gate_layer()
        if not rd_channels:
            rd_channels = make_divisible(in_channels * rd_ratio, rd_divisor)
        self.conv_reduce = nn.Conv2d(in_channels, rd_channels, 1, bias=True)
        if norm:
            self.bn = norm(rd_channels)
        self.conv_expand = nn.Conv2d(rd_channels, in_channels, 1, bias=True)
        self.pool = GlobalAvgPooling(keep_dims=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_reduce(self.pool(x))
        if self.norm:
            x_se = self.bn(x_se)
        x_se = self.gate(self.conv_expand(self.act(x_se)))
        return x * x_se
