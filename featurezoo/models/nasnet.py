"""NASNet-A (4 @ 1056, "mobile"), with MindCV's module tree and parameter names.

`Learning Transferable Architectures for Scalable Image Recognition
<https://arxiv.org/abs/1707.07012>`_. An unpadded 3x3 stride-2 conv, two stem
cells (stride 2 each), then three stages of four cells (a ``FirstCell`` and
three ``NormalCell``) separated by two reduction cells. Every cell takes the
previous cell's output ``x`` and the one before it, ``x_prev``.

``feature_info``: the stem conv (stride 2), ``cell_stem_0`` (4), the last cell
of each stage (``cell_3``: 8, ``cell_9``: 16) and the final ReLU (32), the
strides timm's NASNet taps. :meth:`NASNetAMobile.forward_levels` is the
classifier's own forward, stopping after the deepest requested feature.

Sizes follow MindCV exactly: the stem conv is unpadded (64 px -> 31, so a map
is ``ceil(size / reduction)`` only from stride 4 on), and the first reduction
cell emulates TensorFlow's padding by padding top/left and slicing, which only
lines up with its pooling branches when its input (stride 8) is even: MindCV's
model, and so this one, fails on other sizes (67 px gives 9 there).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from ..builder import SideRule, build_model_with_cfg, generate_default_cfgs
from ..layers import AvgPool2d, GlobalAvgPooling, MaxPool2d
from ..layers.helpers import total_stride
from ..layers.init import fan_out_normal, init_weights, normal
from ..layers.nas_cells import CellChain, SeparableConv2d
from ..registry import register_model

__all__ = ["NASNetAMobile", "CellStem0", "CellStem1", "FirstCell", "NormalCell", "ReductionCell0",
           "ReductionCell1"]


def _bn(chs: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(chs, eps=1e-3)  # MindCV: eps 1e-3, momentum 0.9 (torch 0.1)


def _relu_conv_bn(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(in_chs, out_chs, 1, bias=False), _bn(out_chs))


def _max_pool(stride: int) -> MaxPool2d:
    return MaxPool2d(3, stride, pad_mode="same")


def _avg_pool(stride: int) -> AvgPool2d:
    return AvgPool2d(3, stride, pad_mode="same")


class BranchSeparables(nn.Module):
    """ReLU, separable conv (stride here, width kept), BN, ReLU, separable conv to ``out_channels``, BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 bias: bool = False, stem: bool = False):
        super().__init__()
        # The stem's variant changes width in the first separable conv, the others in the second.
        mid = out_channels if stem else in_channels
        self.relu = nn.ReLU()
        self.separable_1 = SeparableConv2d(in_channels, mid, kernel_size, stride, padding, bias=bias)
        self.bn_sep_1 = _bn(mid)
        self.relu1 = nn.ReLU()
        self.separable_2 = SeparableConv2d(mid, out_channels, kernel_size, 1, padding, bias=bias)
        self.bn_sep_2 = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_sep_1(self.separable_1(self.relu(x)))
        return self.bn_sep_2(self.separable_2(self.relu1(x)))


class BranchSeparablesStem(BranchSeparables):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, stem=True)


class BranchSeparablesReduction(BranchSeparables):
    """``BranchSeparables`` whose first conv sees the input padded top/left by ``z_padding`` and drops the
    first output row and column (TensorFlow's ``same`` padding, emulated)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 z_padding: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)
        self.padding = nn.ZeroPad2d((z_padding, 0, z_padding, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.separable_1(self.padding(self.relu(x)))[:, :, 1:, 1:]
        x = self.bn_sep_1(x)
        return self.bn_sep_2(self.separable_2(self.relu1(x)))


def _factorized_paths(cell: nn.Module, in_chs: int, out_chs: int) -> None:
    """Give ``cell`` MindCV's ``relu``, ``path_1``, ``path_2`` and ``final_path_bn``: two 1x1 convs on the
    input subsampled by 2, the second one shifted by a pixel, concatenated (``2 * out_chs`` channels)."""
    cell.relu = nn.ReLU()
    cell.path_1 = nn.Sequential(nn.AvgPool2d(1, 2), nn.Conv2d(in_chs, out_chs, 1, bias=False))
    cell.path_2 = nn.ModuleList([nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(1, 2),
                                 nn.Conv2d(in_chs, out_chs, 1, bias=False)])
    cell.final_path_bn = _bn(2 * out_chs)


def _factorized_reduce(cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = cell.relu(x)
    shifted = cell.path_2[0](x)[:, :, 1:, 1:]
    shifted = cell.path_2[2](cell.path_2[1](shifted))
    return cell.final_path_bn(torch.cat((cell.path_1(x), shifted), dim=1))


def _reduction_combine(cell: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The stem and reduction cells' five combinations (the ``*_left`` ops take ``a``, ``*_right`` take ``b``)."""
    c0 = cell.comb_iter_0_left(a) + cell.comb_iter_0_right(b)
    c1 = cell.comb_iter_1_left(a) + cell.comb_iter_1_right(b)
    c2 = cell.comb_iter_2_left(a) + cell.comb_iter_2_right(b)
    c3 = cell.comb_iter_3_right(c0) + c1
    c4 = cell.comb_iter_4_left(c0) + cell.comb_iter_4_right(a)
    return torch.cat((c1, c2, c3, c4), dim=1)


def _normal_combine(cell: nn.Module, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The normal cells' five combinations, concatenated after ``left``."""
    c0 = cell.comb_iter_0_left(right) + cell.comb_iter_0_right(left)
    c1 = cell.comb_iter_1_left(left) + cell.comb_iter_1_right(left)
    c2 = cell.comb_iter_2_left(right) + left
    c3 = cell.comb_iter_3_left(left) + cell.comb_iter_3_right(left)
    c4 = cell.comb_iter_4_left(right) + right
    return torch.cat((left, c0, c1, c2, c3, c4), dim=1)


class TwoInputCell(nn.Module):
    """A cell called as ``cell(x, x_prev)``: the previous cell's output and the one before it."""

    out_channels: int


class CellStem0(nn.Module):
    """First stem cell (stride 2): ``4 * num_filters`` channels."""

    def __init__(self, stem_filters: int, num_filters: int = 42):
        super().__init__()
        self.num_filters = num_filters
        self.stem_filters = stem_filters
        self.out_channels = 4 * num_filters
        self.conv_1x1 = _relu_conv_bn(stem_filters, num_filters)
        self.comb_iter_0_left = BranchSeparables(num_filters, num_filters, 5, 2, 2)
        self.comb_iter_0_right = BranchSeparablesStem(stem_filters, num_filters, 7, 2, 3)
        self.comb_iter_1_left = _max_pool(2)
        self.comb_iter_1_right = BranchSeparablesStem(stem_filters, num_filters, 7, 2, 3)
        self.comb_iter_2_left = _avg_pool(2)
        self.comb_iter_2_right = BranchSeparablesStem(stem_filters, num_filters, 5, 2, 2)
        self.comb_iter_3_right = _avg_pool(1)
        self.comb_iter_4_left = BranchSeparables(num_filters, num_filters, 3, 1, 1)
        self.comb_iter_4_right = _max_pool(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _reduction_combine(self, self.conv_1x1(x), x)


class CellStem1(TwoInputCell):
    """Second stem cell (stride 2): ``x`` is ``cell_stem_0``'s output, ``x_prev`` the stem conv's
    (MindCV's ``construct(x_conv0, x_stem_0)``, arguments named here by their role)."""

    def __init__(self, stem_filters: int, num_filters: int):
        super().__init__()
        self.num_filters = num_filters
        self.stem_filters = stem_filters
        self.out_channels = 4 * num_filters
        self.conv_1x1 = _relu_conv_bn(2 * num_filters, num_filters)
        _factorized_paths(self, stem_filters, num_filters // 2)
        self.comb_iter_0_left = BranchSeparables(num_filters, num_filters, 5, 2, 2)
        self.comb_iter_0_right = BranchSeparables(num_filters, num_filters, 7, 2, 3)
        self.comb_iter_1_left = _max_pool(2)
        self.comb_iter_1_right = BranchSeparables(num_filters, num_filters, 7, 2, 3)
        self.comb_iter_2_left = _avg_pool(2)
        self.comb_iter_2_right = BranchSeparables(num_filters, num_filters, 5, 2, 2)
        self.comb_iter_3_right = _avg_pool(1)
        self.comb_iter_4_left = BranchSeparables(num_filters, num_filters, 3, 1, 1)
        self.comb_iter_4_right = _max_pool(2)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return _reduction_combine(self, self.conv_1x1(x), _factorized_reduce(self, x_prev))


class FirstCell(TwoInputCell):
    """First normal cell after a reduction: ``x_prev`` (twice the resolution) is factorized-reduced."""

    def __init__(self, in_channels_left: int, out_channels_left: int, in_channels_right: int,
                 out_channels_right: int):
        super().__init__()
        self.out_channels = 6 * out_channels_left + 3 * out_channels_right
        self.conv_1x1 = _relu_conv_bn(in_channels_right, out_channels_right)
        _factorized_paths(self, in_channels_left, out_channels_left)
        self.comb_iter_0_left = BranchSeparables(out_channels_right, out_channels_right, 5, 1, 2)
        self.comb_iter_0_right = BranchSeparables(out_channels_right, out_channels_right, 3, 1, 1)
        self.comb_iter_1_left = BranchSeparables(out_channels_right, out_channels_right, 5, 1, 2)
        self.comb_iter_1_right = BranchSeparables(out_channels_right, out_channels_right, 3, 1, 1)
        self.comb_iter_2_left = _avg_pool(1)
        self.comb_iter_3_left = _avg_pool(1)
        self.comb_iter_3_right = _avg_pool(1)
        self.comb_iter_4_left = BranchSeparables(out_channels_right, out_channels_right, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return _normal_combine(self, _factorized_reduce(self, x_prev), self.conv_1x1(x))


class NormalCell(TwoInputCell):
    def __init__(self, in_channels_left: int, out_channels_left: int, in_channels_right: int,
                 out_channels_right: int):
        super().__init__()
        self.out_channels = 3 * out_channels_left + 3 * out_channels_right
        self.conv_prev_1x1 = _relu_conv_bn(in_channels_left, out_channels_left)
        self.conv_1x1 = _relu_conv_bn(in_channels_right, out_channels_right)
        self.comb_iter_0_left = BranchSeparables(out_channels_right, out_channels_right, 5, 1, 2)
        self.comb_iter_0_right = BranchSeparables(out_channels_left, out_channels_left, 3, 1, 1)
        self.comb_iter_1_left = BranchSeparables(out_channels_left, out_channels_left, 5, 1, 2)
        self.comb_iter_1_right = BranchSeparables(out_channels_left, out_channels_left, 3, 1, 1)
        self.comb_iter_2_left = _avg_pool(1)
        self.comb_iter_3_left = _avg_pool(1)
        self.comb_iter_3_right = _avg_pool(1)
        self.comb_iter_4_left = BranchSeparables(out_channels_right, out_channels_right, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return _normal_combine(self, self.conv_prev_1x1(x_prev), self.conv_1x1(x))


class _ReductionCell(TwoInputCell):
    """Stride-2 cell; ``branch`` is the separable branch class (the two reduction cells differ only there)."""

    branch: type = BranchSeparables

    def __init__(self, in_channels_left: int, out_channels_left: int, in_channels_right: int,
                 out_channels_right: int):
        super().__init__()
        width, branch = out_channels_right, self.branch
        self.out_channels = 4 * width
        self.conv_prev_1x1 = _relu_conv_bn(in_channels_left, out_channels_left)
        self.conv_1x1 = _relu_conv_bn(in_channels_right, width)
        self.comb_iter_0_left = branch(width, width, 5, 2, 2)
        self.comb_iter_0_right = branch(width, width, 7, 2, 3)
        self.comb_iter_1_left = _max_pool(2)
        self.comb_iter_1_right = branch(width, width, 7, 2, 3)
        self.comb_iter_2_left = _avg_pool(2)
        self.comb_iter_2_right = branch(width, width, 5, 2, 2)
        self.comb_iter_3_right = _avg_pool(1)
        self.comb_iter_4_left = branch(width, width, 3, 1, 1)
        self.comb_iter_4_right = _max_pool(2)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return _reduction_combine(self, self.conv_1x1(x), self.conv_prev_1x1(x_prev))


class ReductionCell0(_ReductionCell):
    branch = BranchSeparablesReduction


class ReductionCell1(_ReductionCell):
    branch = BranchSeparables


class NASNetAMobile(CellChain):
    """NASNet-A classifier; ``feature_info``: ``conv0``, ``cell_stem_0``, ``cell_3``, ``cell_9``, ``relu``.

    Args:
        in_channels, num_classes: input channels, classifier outputs.
        stem_filters: width of the stem conv.
        penultimate_filters: width of the last cells' output (24 times the base width).
        filters_multiplier: width ratio between the two stem cells and the first stage.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, stem_filters: int = 32,
                 penultimate_filters: int = 1056, filters_multiplier: int = 2):
        super().__init__()
        self.stem_filters = stem_filters
        self.penultimate_filters = penultimate_filters
        self.filters_multiplier = filters_multiplier
        filters = penultimate_filters // 24

        self.conv0 = nn.Sequential(nn.Conv2d(in_channels, stem_filters, 3, 2, bias=False), _bn(stem_filters))
        reduction = total_stride(self.conv0)
        # (name, channels, reduction) of every module of the forward chain, in order.
        levels: List[Tuple[str, int, int]] = [("conv0", stem_filters, reduction)]
        for i, num in enumerate((filters // filters_multiplier ** 2, filters // filters_multiplier)):
            cell = CellStem0(stem_filters, num) if i == 0 else CellStem1(stem_filters, num)
            reduction *= 2
            self.add_module(f"cell_stem_{i}", cell)
            levels.append((f"cell_stem_{i}", cell.out_channels, reduction))
        # Three stages of four cells (the first one factorized-reduces x_prev); a reduction cell between stages.
        for stage, mult in enumerate((1, 2, 4)):
            width = mult * filters
            if stage > 0:
                reduction_cls = ReductionCell0 if stage == 1 else ReductionCell1
                self._add_cell(f"reduction_cell_{stage - 1}", reduction_cls, width, width, levels, stride=2)
            self._add_cell(f"cell_{6 * stage}", FirstCell, width // 2, width, levels)
            for j in range(1, 4):
                self._add_cell(f"cell_{6 * stage + j}", NormalCell, width, width, levels)
        self.relu = nn.ReLU()
        levels.append(("relu",) + levels[-1][1:])
        self.num_features = levels[-1][1]
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.pool = GlobalAvgPooling()

        self._set_chain(levels)
        init_weights(self, conv=fan_out_normal, linear=normal(0.01))

    def _add_cell(self, name: str, cls: type, out_left: int, out_right: int, levels: List[Tuple[str, int, int]],
                  stride: int = 1) -> None:
        # A cell reads x_prev (left) and x (right): the outputs of the two chain modules before it.
        (_, in_left, _), (_, in_right, reduction) = levels[-2], levels[-1]
        cell = cls(in_left, out_left, in_right, out_right)
        self.add_module(name, cell)
        levels.append((name, cell.out_channels, reduction * stride))

    def run_module(self, module: nn.Module, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return module(x, x_prev) if isinstance(module, TwoInputCell) else module(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_nasnet(variant: str, pretrained: bool = False, **kwargs) -> NASNetAMobile:
    return build_model_with_cfg(NASNetAMobile, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv0.0", classifier="classifier",
                valid_padding="unpadded 3x3 stride-2 stem; reduction_cell_0 needs an even stride-8 map (MindCV too)",
                side_rules=(SideRule(16, (11, 12, 13, 14, 15, 0, 1, 2), minimum=30, from_reduction=16),),
                size_note="MindCV's TensorFlow-padding emulation lines up only for an even stride-8 map: "
                          "sides 16k-5..16k+2 px for the stride-16 and -32 levels", **kwargs)


default_cfgs: Dict = generate_default_cfgs({
    "nasnet_a_4x1056": _cfg("https://download.mindspore.cn/toolkits/mindcv/nasnet/nasnet_a_4x1056-0fbb5cdd.ckpt"),
})


@register_model
def nasnet_a_4x1056(pretrained: bool = False, **kwargs) -> NASNetAMobile:
    return _create_nasnet("nasnet_a_4x1056", pretrained, **kwargs)
