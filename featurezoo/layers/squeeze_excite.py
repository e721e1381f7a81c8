"""Squeeze-and-Excitation, as MindCV's ``layers.SqueezeExcite`` (1x1 convolutions)
and ``layers.SqueezeExciteV2`` (fully connected layers).

`Squeeze-and-Excitation Networks <https://arxiv.org/abs/1709.01507>`_. Module
and parameter names follow MindCV (``conv_reduce``, optional ``bn``,
``conv_expand``), so its checkpoints map one to one. The two classes have the
same module tree; their weights differ in shape, ``(out, in, 1, 1)`` against
``(out, in)``, so a checkpoint fits only the one it was saved from (SENet's
is V2, RegNetY's and EfficientNet's the conv one).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn

from .helpers import make_divisible
from .pooling import GlobalAvgPooling

__all__ = ["SqueezeExcite", "SqueezeExciteV2"]


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

    linear = False  # nn.Linear layers on the pooled vector instead of 1x1 convs

    def __init__(self, in_channels: int, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 8, norm: Optional[Callable[[int], nn.Module]] = None,
                 act_layer: Callable[[], nn.Module] = nn.ReLU, gate_layer: Callable[[], nn.Module] = nn.Sigmoid):
        super().__init__()
        self.norm = norm
        self.act = act_layer()
        self.gate = gate_layer()
        if not rd_channels:
            rd_channels = make_divisible(in_channels * rd_ratio, rd_divisor)
        proj = nn.Linear if self.linear else partial(nn.Conv2d, kernel_size=1, bias=True)
        self.conv_reduce = proj(in_channels, rd_channels)
        if norm:
            self.bn = norm(rd_channels)
        self.conv_expand = proj(rd_channels, in_channels)
        self.pool = GlobalAvgPooling(keep_dims=not self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_reduce(self.pool(x))
        if self.norm:
            x_se = self.bn(x_se)
        x_se = self.gate(self.conv_expand(self.act(x_se)))
        return x * (x_se[:, :, None, None] if self.linear else x_se)


class SqueezeExciteV2(SqueezeExcite):
    """:class:`SqueezeExcite` with ``nn.Linear`` layers (MindCV's ``layers.SqueezeExciteV2``, SENet's gate)."""

    linear = True
