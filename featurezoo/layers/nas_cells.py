"""Pieces shared by the searched-cell models (NASNet-A, PNASNet-5).

Both are a chain of named children (stem conv, stem cells, cells) in which a
cell reads two inputs: the previous module's output and the one before it.
:class:`CellChain` runs and prunes such a chain for feature extraction; the
two families differ only in the order their cells take the two inputs.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..features import take_levels
from .feature_levels import note_feature

__all__ = ["SeparableConv2d", "CellChain"]


class SeparableConv2d(nn.Module):
    """Depthwise ``k x k`` conv (explicit padding) then pointwise 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, dw_kernel: int, dw_stride: int, dw_padding: int,
                 bias: bool = False):
        super().__init__()
        self.depthwise_conv2d = nn.Conv2d(in_channels, in_channels, dw_kernel, dw_stride, dw_padding,
                                          groups=in_channels, bias=bias)
        self.pointwise_conv2d = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv2d(self.depthwise_conv2d(x))


class CellChain(nn.Module):
    """A model whose forward is the chain of children named in ``_chain``, each called by :meth:`run_module`.

    A subclass builds its modules, collecting ``(name, channels, reduction)``
    of every chain module in order, and hands that list to
    :meth:`_set_chain`, which registers the last module at each reduction in
    ``feature_info``. Modules after the chain (the head) are the ones
    :meth:`prune_levels` removes with the unused cells.
    """

    _chain: List[str]
    feature_info: List[Dict]

    def run_module(self, module: nn.Module, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """Run one chain module on ``x`` (the previous output) and ``x_prev`` (the one before it)."""
        raise NotImplementedError

    def _set_chain(self, levels: Sequence[Tuple[str, int, int]]) -> None:
        self._chain = [name for name, _, _ in levels]
        self.feature_info = []
        for name, chs, reduction in levels:
            note_feature(self.feature_info, chs, reduction, name)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        wanted = {self.feature_info[i]["name"] for i in take}
        last = self.feature_info[deepest]["name"]
        out: List[torch.Tensor] = []
        x_prev = x
        for name in self._chain:
            x_prev, x = x, self.run_module(getattr(self, name), x, x_prev)
            if name in wanted:
                out.append(x)
            if name == last:
                break
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every module after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        last = self.feature_info[deepest]["name"]
        names = list(self._modules)
        for name in names[names.index(last) + 1:]:
            delattr(self, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]
