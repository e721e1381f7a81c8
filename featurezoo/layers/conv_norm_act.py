"""Convolution + normalisation + activation.

:class:`Conv2dNormActivation` is MindCV's ``layers.Conv2dNormActivation``: the
three layers sit in an ``nn.Sequential`` named ``features`` (children ``0``,
``1``, ``2``), MindCV's module tree, so parameter names map one to one
(``features.0.weight``, ``features.1.weight`` ...). :class:`BasicConv2d` is
the ``conv``/``bn``/``relu`` block of MindCV's Inception v3 and v4.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .padding import Conv2d

__all__ = ["Conv2dNormActivation", "BasicConv2d"]


class Conv2dNormActivation(nn.Module):
    """``act(norm(conv(x)))`` with MindSpore padding semantics.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: the convolution.
        pad_mode: MindSpore's ``pad_mode``; with ``"pad"`` (MindCV's default
            here) and ``padding=None`` the padding is
            ``((stride - 1) + dilation * (kernel_size - 1)) // 2``.
        norm: normalisation class called with ``out_channels``, or ``None``.
        activation: activation class called with no arguments, or ``None``.
        has_bias: conv bias; ``None`` means "only without a norm".
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 pad_mode: str = "pad", padding: Optional[int] = None, dilation: int = 1, groups: int = 1,
                 norm: Optional[Callable[[int], nn.Module]] = nn.BatchNorm2d,
                 activation: Optional[Callable[[], nn.Module]] = nn.ReLU, has_bias: Optional[bool] = None):
        super().__init__()
        if pad_mode == "pad":
            if padding is None:
                padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        else:
            padding = 0
        if has_bias is None:
            has_bias = norm is None
        layers: List[nn.Module] = [Conv2d(in_channels, out_channels, kernel_size, stride, pad_mode=pad_mode,
                                          padding=padding, dilation=dilation, group=groups, has_bias=has_bias)]
        if norm:
            layers.append(norm(out_channels))
        if activation:
            layers.append(activation())
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class BasicConv2d(nn.Module):
    """Conv (MindSpore ``pad_mode``, no bias) + BN (eps 1e-3, MindSpore momentum 0.9997) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]] = 1,
                 stride: int = 1, pad_mode: str = "same", padding: int = 0):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, pad_mode=pad_mode, padding=padding)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=1 - 0.9997)
        self.relu = nn.ReLU()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))
