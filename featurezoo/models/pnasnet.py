"""PNASNet-5 (MindCV's ``pnasnet``), with MindCV's module tree and parameter names.

`Progressive Neural Architecture Search <https://arxiv.org/abs/1712.00559>`_.
An unpadded 3x3 stride-2 conv, a stem cell (stride 2), then ten cells, three of
them reductions (``cell_stem_1``, ``cell_3``, ``cell_6``). Every cell after the
first takes the output before the previous one (``x_left``) and the previous
one (``x_right``); a cell whose ``x_left`` has twice its resolution reduces it
first (``FactorizedReduction``).

``feature_info``: the stem conv (stride 2), ``cell_stem_0`` (4) and the last
cell at strides 8, 16 and 32 (``cell_2``, ``cell_5``, ``cell_8``), the strides
timm's PNASNet taps. MindCV applies the final ReLU in the head, so the stride-32
feature is ``cell_8``'s output before it. :meth:`Pnasnet.forward_levels`
is the classifier's own forward, stopping after the deepest requested feature.

Sizes follow MindCV exactly: the stem conv is unpadded (64 px -> 31, so a map
is ``ceil(size / reduction)`` only from stride 4 on), and ``cell_3`` emulates
TensorFlow's padding (pad top/left, slice), which gives ``floor(n / 2)`` where
its 1x1 stride-2 branch gives ``ceil(n / 2)``: MindCV's model, and so this one,
fails unless the stride-8 map is even (67 px gives 9 there).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..builder import SideRule, build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling, MaxPool2d
from ..layers.init import fan_out_normal, init_weights, normal
from ..layers.nas_cells import CellChain, SeparableConv2d
from ..registry import register_model

__all__ = ["Pnasnet", "CellStem0", "Cell"]

# (name, width, is_reduction, zero_pad) of the cells after the stem cell; a cell outputs 5 * width channels.
CELLS: Tuple[Tuple[str, int, bool, bool], ...] = (
    ("cell_stem_1", 27, True, False),
    ("cell_0", 54, False, False), ("cell_1", 54, False, False), ("cell_2", 54, False, False),
    ("cell_3", 108, True, True), ("cell_4", 108, False, False), ("cell_5", 108, False, False),
    ("cell_6", 216, True, False), ("cell_7", 216, False, False), ("cell_8", 216, False, False),
)


def _bn(chs: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(chs, eps=1e-3)  # MindCV: eps 1e-3, momentum 0.9 (torch 0.1)


class MaxPool(nn.Module):
    """3x3 max pool with MindSpore's ``same`` padding; with ``zero_pad`` the input is first padded by a zero
    row and column at the top/left and the first output row and column are dropped."""

    def __init__(self, kernel_size: int, stride: int = 1, zero_pad: bool = False):
        super().__init__()
        self.pad = zero_pad
        if zero_pad:
            self.zero_pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.pool = MaxPool2d(kernel_size, stride, pad_mode="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            return self.pool(self.zero_pad(x))[:, :, 1:, 1:]
        return self.pool(x)


class BranchSeparables(nn.Module):
    """ReLU, separable conv (stride here), BN, ReLU, separable conv, BN. The stem cell's variant changes
    width in the first conv; ``zero_pad`` pads/slices around the first conv as :class:`MaxPool`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 stem_cell: bool = False, zero_pad: bool = False):
        super().__init__()
        padding = kernel_size // 2
        mid = out_channels if stem_cell else in_channels
        self.pad = zero_pad
        if zero_pad:
            self.zero_pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.relu_1 = nn.ReLU()
        self.separable_1 = SeparableConv2d(in_channels, mid, kernel_size, stride, padding)
        self.bn_sep_1 = _bn(mid)
        self.relu_2 = nn.ReLU()
        self.separable_2 = SeparableConv2d(mid, out_channels, kernel_size, 1, padding)
        self.bn_sep_2 = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_1(x)
        if self.pad:
            x = self.separable_1(self.zero_pad(x))[:, :, 1:, 1:]
        else:
            x = self.separable_1(x)
        x = self.bn_sep_1(x)
        return self.bn_sep_2(self.separable_2(self.relu_2(x)))


class ReluConvBn(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, bias=False)
        self.bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.relu(x)))


class FactorizedReduction(nn.Module):
    """Halve the resolution: two 1x1 convs on the input subsampled by 2, the second one shifted by a pixel,
    concatenated and normalised."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.path_1 = nn.Sequential(OrderedDict([
            ("avgpool", nn.AvgPool2d(1, 2)),
            ("conv", nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)),
        ]))
        self.path_2 = nn.ModuleList([
            nn.ZeroPad2d((0, 1, 0, 1)),
            nn.AvgPool2d(1, 2),
            nn.Conv2d(in_channels, out_channels // 2 + out_channels % 2, 1, bias=False),
        ])
        self.final_path_bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = self.path_2[0](x)[:, :, 1:, 1:]
        shifted = self.path_2[2](self.path_2[1](shifted))
        return self.final_path_bn(torch.cat((self.path_1(x), shifted), dim=1))


class CellBase(nn.Module):
    """The five combinations of a PNASNet cell, concatenated: ``5 * out_channels_right`` channels."""

    comb_iter_4_right: Optional[nn.Module]

    def cell_forward(self, x_left: torch.Tensor, x_right: torch.Tensor) -> torch.Tensor:
        c0 = self.comb_iter_0_left(x_left) + self.comb_iter_0_right(x_left)
        c1 = self.comb_iter_1_left(x_right) + self.comb_iter_1_right(x_right)
        c2 = self.comb_iter_2_left(x_right) + self.comb_iter_2_right(x_right)
        c3 = self.comb_iter_3_left(c2) + self.comb_iter_3_right(x_right)
        right = x_right if self.comb_iter_4_right is None else self.comb_iter_4_right(x_right)
        c4 = self.comb_iter_4_left(x_left) + right
        return torch.cat((c0, c1, c2, c3, c4), dim=1)


class CellStem0(CellBase):
    """The stem cell (stride 2), on the stem conv's output alone."""

    def __init__(self, in_channels_left: int, out_channels_left: int, in_channels_right: int,
                 out_channels_right: int):
        super().__init__()
        self.out_channels = 5 * out_channels_right
        self.conv_1x1 = ReluConvBn(in_channels_right, out_channels_right, kernel_size=1)
        self.comb_iter_0_left = BranchSeparables(in_channels_left, out_channels_left, 5, stride=2, stem_cell=True)
        self.comb_iter_0_right = nn.Sequential(OrderedDict([
            ("max_pool", MaxPool(3, stride=2)),
            ("conv", nn.Conv2d(in_channels_left, out_channels_left, 1, bias=False)),
            ("bn", _bn(out_channels_left)),
        ]))
        self.comb_iter_1_left = BranchSeparables(out_channels_right, out_channels_right, 7, stride=2)
        self.comb_iter_1_right = MaxPool(3, stride=2)
        self.comb_iter_2_left = BranchSeparables(out_channels_right, out_channels_right, 5, stride=2)
        self.comb_iter_2_right = BranchSeparables(out_channels_right, out_channels_right, 3, stride=2)
        self.comb_iter_3_left = BranchSeparables(out_channels_right, out_channels_right, 3)
        self.comb_iter_3_right = MaxPool(3, stride=2)
        self.comb_iter_4_left = BranchSeparables(in_channels_right, out_channels_right, 3, stride=2, stem_cell=True)
        self.comb_iter_4_right = ReluConvBn(out_channels_right, out_channels_right, kernel_size=1, stride=2)

    def forward(self, x_left: torch.Tensor) -> torch.Tensor:
        return self.cell_forward(x_left, self.conv_1x1(x_left))


class Cell(CellBase):
    """A normal or reduction cell, called as ``cell(x_left, x_right)`` (the output before the previous one,
    and the previous one)."""

    def __init__(self, in_channels_left: int, out_channels_left: int, in_channels_right: int,
                 out_channels_right: int, is_reduction: bool = False, zero_pad: bool = False,
                 match_prev_layer_dimensions: bool = False):
        super().__init__()
        stride = 2 if is_reduction else 1
        self.out_channels = 5 * out_channels_right
        self.match_prev_layer_dimensions = match_prev_layer_dimensions
        if match_prev_layer_dimensions:
            self.conv_prev_1x1 = FactorizedReduction(in_channels_left, out_channels_left)
        else:
            self.conv_prev_1x1 = ReluConvBn(in_channels_left, out_channels_left, kernel_size=1)
        self.conv_1x1 = ReluConvBn(in_channels_right, out_channels_right, kernel_size=1)
        left, right = out_channels_left, out_channels_right
        self.comb_iter_0_left = BranchSeparables(left, left, 5, stride, zero_pad=zero_pad)
        self.comb_iter_0_right = MaxPool(3, stride, zero_pad=zero_pad)
        self.comb_iter_1_left = BranchSeparables(right, right, 7, stride, zero_pad=zero_pad)
        self.comb_iter_1_right = MaxPool(3, stride, zero_pad=zero_pad)
        self.comb_iter_2_left = BranchSeparables(right, right, 5, stride, zero_pad=zero_pad)
        self.comb_iter_2_right = BranchSeparables(right, right, 3, stride, zero_pad=zero_pad)
        self.comb_iter_3_left = BranchSeparables(right, right, 3)
        self.comb_iter_3_right = MaxPool(3, stride, zero_pad=zero_pad)
        self.comb_iter_4_left = BranchSeparables(left, left, 3, stride, zero_pad=zero_pad)
        self.comb_iter_4_right = ReluConvBn(right, right, 1, stride) if is_reduction else None

    def forward(self, x_left: torch.Tensor, x_right: torch.Tensor) -> torch.Tensor:
        return self.cell_forward(self.conv_prev_1x1(x_left), self.conv_1x1(x_right))


class Pnasnet(CellChain):
    """PNASNet-5 classifier; ``feature_info``: ``conv_0``, ``cell_stem_0``, ``cell_2``, ``cell_5``, ``cell_8``.

    Args:
        in_channels, num_classes: input channels, classifier outputs.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        self.num_classes = num_classes
        stem_w, stem_cell_w = 32, 13
        self.conv_0 = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_channels, stem_w, 3, 2, bias=False)),
            ("bn", _bn(stem_w)),
        ]))
        self.cell_stem_0 = CellStem0(stem_w, stem_cell_w, stem_w, stem_cell_w)
        # (name, channels, reduction) of every module of the forward chain, in order.
        levels: List[Tuple[str, int, int]] = [("conv_0", stem_w, 2), ("cell_stem_0", self.cell_stem_0.out_channels, 4)]
        for name, width, is_reduction, zero_pad in CELLS:
            (_, left_chs, left_red), (_, right_chs, right_red) = levels[-2], levels[-1]
            cell = Cell(left_chs, width, right_chs, width, is_reduction=is_reduction, zero_pad=zero_pad,
                        match_prev_layer_dimensions=left_red < right_red)
            self.add_module(name, cell)
            levels.append((name, cell.out_channels, right_red * (2 if is_reduction else 1)))
        self.num_features = levels[-1][1]
        self.relu = nn.ReLU()
        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(0.5)
        self.last_linear = nn.Linear(self.num_features, num_classes)

        self._set_chain(levels)
        init_weights(self, conv=fan_out_normal, linear=normal(0.01))

    def run_module(self, module: nn.Module, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return module(x_prev, x) if isinstance(module, Cell) else module(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_linear(self.dropout(self.pool(self.relu(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_pnasnet(variant: str, pretrained: bool = False, **kwargs) -> Pnasnet:
    return build_model_with_cfg(Pnasnet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv_0.conv", classifier="last_linear",
                valid_padding="unpadded 3x3 stride-2 stem; cell_3 needs an even stride-8 map (MindCV too)",
                side_rules=(SideRule(16, (11, 12, 13, 14, 15, 0, 1, 2), minimum=30, from_reduction=16),),
                size_note="MindCV's TensorFlow-padding emulation lines up only for an even stride-8 map: "
                          "sides 16k-5..16k+2 px for the stride-16 and -32 levels", **kwargs)


default_cfgs: Dict = generate_default_cfgs({
    "pnasnet": _cfg(),
})


@register_model
def pnasnet(pretrained: bool = False, **kwargs) -> Pnasnet:
    return _create_pnasnet("pnasnet", pretrained, **kwargs)
