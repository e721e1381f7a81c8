"""RegNetX and RegNetY, with MindCV's module tree and parameter names.

`Designing Network Design Spaces <https://arxiv.org/abs/2003.13678>`_. A 3x3
stride-2 stem and four stages of residual bottleneck blocks (group conv, and
for RegNetY a squeeze-excitation gate) whose widths and depths follow from the
quantised linear rule ``w_j = w_0 + w_a * j``; the stride sits in each stage's
first block. All convs pad explicitly (``k // 2``), so a map has exactly
``ceil(size / reduction)`` pixels at any size.

``feature_info``: the stem (stride 2) and the end of each stage (strides 4, 8,
16, 32), as timm's RegNet taps. ``output_stride=16`` (or 8) trades the stride of
the last stage (or two) for dilation, as timm's RegNet does: the first block's
3x3 conv keeps the dilation before the stage, every later one takes the new one. The stages sit in a ``ModuleList`` (MindCV's
``CellList``), so :meth:`RegNet.forward_levels` is the classifier's own
forward, stopping after the deepest requested feature.

Checkpoint names: MindCV's ``stages`` CellList is empty when attached to the
model and filled by ``append`` afterwards, and MindSpore's ``append`` guesses
the list's name prefix from its first element's parameter names. MindCV's
networks and checkpoints therefore name the stages' parameters
``0.blocks.{j}...`` (stage 0) and ``0.blocks.{i}.blocks.{j}...`` (stage i > 0),
which no module tree can reproduce where stage 0 has two blocks or more
(``0.blocks.1`` would be both a block and a stage). The module tree here keeps the names MindCV's code declares
(``stages.{i}.blocks.{j}``); its cfg's ``mindcv_renames`` map MindSpore's names onto them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..cfg import IndexMap
from ..features import take_levels
from ..layers import GlobalAvgPooling
from ..layers.init import fan_out_normal, init_weights, normal
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["RegNet", "ResBottleneckBlock", "BottleneckTransform", "generate_regnet"]


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
          dilation: int = 1) -> nn.Conv2d:
    # MindCV: pad_mode="pad" with (k - 1) // 2, no bias; the padding grows with the dilation.
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=dilation * (kernel_size - 1) // 2,
                     dilation=dilation, groups=groups, bias=False)


def _bn(chs: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(chs, eps=1e-5)  # MindCV: eps 1e-5, momentum 0.9 (torch 0.1)


def generate_regnet(w_a: float, w_0: int, w_m: float, depth: int, group_w: int, bot_mul: float = 1.0,
                    q: int = 8) -> Tuple[List[int], List[int], List[int]]:
    """Per-stage widths, depths and group widths of a RegNet (the paper's quantised linear rule).

    >>> generate_regnet(35.73, 56, 2.28, 16, 16)  # regnet_x_800mf
    ([64, 128, 288, 672], [1, 3, 7, 5], [16, 16, 16, 16])
    """
    if not (w_a >= 0 and w_0 > 0 and w_m > 1 and w_0 % q == 0):
        raise ValueError(f"invalid RegNet parameters w_a={w_a}, w_0={w_0}, w_m={w_m} (w_0 must be a multiple of {q})")
    widths: List[int] = []
    depths: List[int] = []
    for j in range(depth):
        k = round(math.log((w_0 + w_a * j) / w_0) / math.log(w_m))
        w = int(round(w_0 * w_m ** k / q)) * q
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    # Make every bottleneck width a multiple of its group width (MindCV's adjust_block_compatibility).
    inner = [int(max(1, w * bot_mul)) for w in widths]
    groups = [int(min(group_w, v)) for v in inner]
    multiples = [math.lcm(g, int(bot_mul)) if bot_mul > 1 else g for g in groups]
    inner = [max(m, int(round(v / m) * m)) for v, m in zip(inner, multiples)]
    widths = [int(v / bot_mul) for v in inner]
    return widths, depths, groups


class SimpleStem(nn.Module):
    """3x3 stride-2 conv, BN, ReLU."""

    def __init__(self, w_in: int, w_out: int):
        super().__init__()
        self.conv = _conv(w_in, w_out, 3, stride=2)
        self.bn = _bn(w_out)
        self.af = nn.ReLU(inplace=True)  # every ReLU here acts on a fresh BN output or sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.af(self.bn(self.conv(x)))


class BottleneckTransform(nn.Module):
    """1x1, 3x3 group conv (stride or dilation here), optional SE, 1x1; BN after each conv."""

    def __init__(self, w_in: int, w_out: int, stride: int, bot_mul: float, group_w: int, se_r: float,
                 dilation: int = 1):
        super().__init__()
        w_b = int(round(w_out * bot_mul))
        w_se = int(round(w_in * se_r))  # the SE width follows the block's input width, as in MindCV
        self.a = _conv(w_in, w_b, 1)
        self.a_bn = _bn(w_b)
        self.a_af = nn.ReLU(inplace=True)
        self.b = _conv(w_b, w_b, 3, stride, groups=w_b // group_w, dilation=dilation)
        self.b_bn = _bn(w_b)
        self.b_af = nn.ReLU(inplace=True)
        self.se = SqueezeExcite(w_b, rd_channels=w_se) if w_se else None
        self.c = _conv(w_b, w_out, 1)
        self.c_bn = _bn(w_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b_af(self.b_bn(self.b(self.a_af(self.a_bn(self.a(x))))))
        if self.se is not None:
            x = self.se(x)
        return self.c_bn(self.c(x))


class ResBottleneckBlock(nn.Module):
    """``relu(proj(x) + f(x))``; ``proj``/``bn`` (1x1 conv + BN) only where width or stride change
    (a stride traded for dilation, ``dilation != next_dilation``, counts as a change, as in timm).

    ``dilation``: of the 3x3 conv; ``next_dilation``: that of the blocks after this one."""

    def __init__(self, w_in: int, w_out: int, stride: int, bot_mul: float, group_w: int, se_r: float,
                 dilation: int = 1, next_dilation: Optional[int] = None):
        super().__init__()
        self.proj: Optional[nn.Conv2d] = None
        self.bn: Optional[nn.BatchNorm2d] = None
        if w_in != w_out or stride != 1 or next_dilation not in (None, dilation):
            self.proj = _conv(w_in, w_out, 1, stride)
            self.bn = _bn(w_out)
        self.f = BottleneckTransform(w_in, w_out, stride, bot_mul, group_w, se_r, dilation)
        self.af = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projection after f(x), not held through it; the sum in place on f's fresh BN output.
        out = self.f(x)
        return self.af(out.add_(x if self.proj is None else self.bn(self.proj(x))))


class AnyStage(nn.Module):
    """Blocks of one width; the first one strides (or, dilated, keeps ``first_dilation``)."""

    def __init__(self, w_in: int, w_out: int, stride: int, depth: int, bot_mul: float, group_w: int, se_r: float,
                 dilation: int = 1, first_dilation: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(ResBottleneckBlock(w_in, w_out, stride, bot_mul, group_w, se_r, first_dilation,
                                                  dilation))
            stride, w_in, first_dilation = 1, w_out, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class AnyHead(nn.Module):
    """Global average pooling and a linear classifier (MindCV's ``head_w=0``: no head conv)."""

    def __init__(self, w_in: int, num_classes: int):
        super().__init__()
        self.head_width = 0
        self.avg_pool = GlobalAvgPooling()
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avg_pool(x))


class RegNet(nn.Module):
    """RegNet classifier; ``feature_info``: ``stem`` and ``stages.0`` .. ``stages.3``.

    Args:
        w_a, w_0, w_m, d: the width rule's slope, initial width, quantisation
            factor and total depth (see :func:`generate_regnet`).
        group_w: group width of the 3x3 convs.
        stride: stride of each stage.
        bot_mul: bottleneck width multiplier.
        stem_w: stem width.
        se_r: squeeze-excitation ratio (0: RegNetX, 0.25: RegNetY).
        num_classes, in_channels: classifier outputs, input channels.
        output_stride: 32, or 16 / 8 to dilate the stages that would pass that stride
            instead of striding them (timm's schedule).
    """

    def __init__(self, w_a: float, w_0: int, w_m: float, d: int, group_w: int, stride: int = 2,
                 bot_mul: float = 1.0, stem_w: int = 32, se_r: float = 0.0, num_classes: int = 1000,
                 in_channels: int = 3, output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"RegNet: output_stride must be 8, 16 or 32, got {output_stride!r}")
        widths, depths, group_ws = generate_regnet(w_a, w_0, w_m, d, group_w, bot_mul)
        self.stem = SimpleStem(in_channels, stem_w)
        reduction = self.stem.conv.stride[0]
        self.feature_info = [dict(chs=stem_w, reduction=reduction, name="stem")]
        self.stages = nn.ModuleList()
        prev_w, dilation = stem_w, 1
        for i, (w, depth, g) in enumerate(zip(widths, depths, group_ws)):
            stage_stride, first_dilation = stride, dilation
            if reduction * stride > output_stride:
                stage_stride, dilation = 1, dilation * stride
            self.stages.append(AnyStage(prev_w, w, stage_stride, depth, bot_mul, g, se_r, dilation, first_dilation))
            reduction *= stage_stride
            self.feature_info.append(dict(chs=w, reduction=reduction, name=f"stages.{i}", stage=i + 1))
            prev_w = w
        self.num_features = prev_w
        self.head = AnyHead(prev_w, num_classes)
        init_weights(self, conv=fan_out_normal, linear=normal(0.01))

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        x = self.stem(x)
        if 0 in take:
            out.append(x)
        for i, stage in enumerate(self.stages[:deepest], start=1):
            x = stage(x)
            if i in take:
                out.append(x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every stage after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.head
        del self.stages[deepest:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_regnet(variant: str, pretrained: bool = False, **kwargs) -> RegNet:
    return build_model_with_cfg(RegNet, pretrained, default_cfg=default_cfgs[variant], **vars(model_cfgs[variant]),
                                **kwargs)


@dataclass(frozen=True)
class RegNetCfg:
    """A variant's width rule (see :class:`RegNet`); ``se_r=0.25`` makes it a RegNetY."""

    w_a: float
    w_0: int
    w_m: float
    d: int
    group_w: int
    se_r: float = 0.0


model_cfgs = dict(
    regnet_x_200mf=RegNetCfg(w_a=36.44, w_0=24, w_m=2.49, d=13, group_w=8),
    regnet_x_400mf=RegNetCfg(w_a=24.48, w_0=24, w_m=2.54, d=22, group_w=16),
    regnet_x_600mf=RegNetCfg(w_a=36.97, w_0=48, w_m=2.24, d=16, group_w=24),
    regnet_x_800mf=RegNetCfg(w_a=35.73, w_0=56, w_m=2.28, d=16, group_w=16),
    regnet_x_1_6gf=RegNetCfg(w_a=34.01, w_0=80, w_m=2.25, d=18, group_w=24),
    regnet_x_3_2gf=RegNetCfg(w_a=26.31, w_0=88, w_m=2.25, d=25, group_w=48),
    regnet_x_4_0gf=RegNetCfg(w_a=38.65, w_0=96, w_m=2.43, d=23, group_w=40),
    regnet_x_6_4gf=RegNetCfg(w_a=60.83, w_0=184, w_m=2.07, d=17, group_w=56),
    regnet_x_8_0gf=RegNetCfg(w_a=49.56, w_0=80, w_m=2.88, d=23, group_w=120),
    regnet_x_12gf=RegNetCfg(w_a=73.36, w_0=168, w_m=2.37, d=19, group_w=112),
    regnet_x_16gf=RegNetCfg(w_a=55.59, w_0=216, w_m=2.1, d=22, group_w=128),
    regnet_x_32gf=RegNetCfg(w_a=69.86, w_0=320, w_m=2.0, d=23, group_w=168),
    regnet_y_200mf=RegNetCfg(w_a=36.44, w_0=24, w_m=2.49, d=13, group_w=8, se_r=0.25),
    regnet_y_400mf=RegNetCfg(w_a=27.89, w_0=48, w_m=2.09, d=16, group_w=8, se_r=0.25),
    regnet_y_600mf=RegNetCfg(w_a=32.54, w_0=48, w_m=2.32, d=15, group_w=16, se_r=0.25),
    regnet_y_800mf=RegNetCfg(w_a=38.84, w_0=56, w_m=2.4, d=14, group_w=16, se_r=0.25),
    regnet_y_1_6gf=RegNetCfg(w_a=20.71, w_0=48, w_m=2.65, d=27, group_w=24, se_r=0.25),
    regnet_y_3_2gf=RegNetCfg(w_a=42.63, w_0=80, w_m=2.66, d=21, group_w=24, se_r=0.25),
    regnet_y_4_0gf=RegNetCfg(w_a=31.41, w_0=96, w_m=2.24, d=22, group_w=64, se_r=0.25),
    regnet_y_6_4gf=RegNetCfg(w_a=33.22, w_0=112, w_m=2.27, d=25, group_w=72, se_r=0.25),
    regnet_y_8_0gf=RegNetCfg(w_a=76.82, w_0=192, w_m=2.19, d=17, group_w=56, se_r=0.25),
    regnet_y_12gf=RegNetCfg(w_a=73.36, w_0=168, w_m=2.37, d=19, group_w=112, se_r=0.25),
    regnet_y_16gf=RegNetCfg(w_a=106.23, w_0=200, w_m=2.48, d=18, group_w=112, se_r=0.25),
    regnet_y_32gf=RegNetCfg(w_a=115.89, w_0=232, w_m=2.53, d=20, group_w=232, se_r=0.25),
)


def _cfg(url: str = "", **kwargs):
    # MindCV's cfg names no first conv and a "classifier" module that RegNet does not have; these are the real ones.
    return dict(url=url, num_classes=1000, first_conv="stem.conv", classifier="head.fc", output_strides=(8, 16, 32),
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/regnet"
# MindSpore's parameter names of the stages (see the module docstring) -> ours; applied in order.
_MINDCV_RENAMES = ((r"^0\.blocks\.(\d+)\.blocks\.", r"stages.\1.blocks."), (r"^0\.blocks\.", "stages.0.blocks."))

# timm models with the same architecture and parameters (regnetx_002 is regnet_x_200mf, ...).
_TIMM_TWINS = {
    f"regnet_{xy}_{ours}": f"regnet{xy}_{theirs}" for xy in "xy" for ours, theirs in (
        ("200mf", "002"), ("400mf", "004"), ("600mf", "006"), ("800mf", "008"), ("1_6gf", "016"), ("3_2gf", "032"),
        ("4_0gf", "040"), ("6_4gf", "064"), ("8_0gf", "080"), ("12gf", "120"), ("16gf", "160"), ("32gf", "320"))
}

# timm's s<i>.b<j> (from 1) are stages.<i-1>.blocks.<j-1> here; the block's convs a, b, c and shortcut proj.
_TIMM_RENAMES = (
    (r"^s(\d+)\.b(\d+)\.", IndexMap("stages.{0}.blocks.{1}.", (1, -1), (1, -1))),
    (r"\.conv1\.conv\.", ".f.a."), (r"\.conv1\.bn\.", ".f.a_bn."), (r"\.conv2\.conv\.", ".f.b."),
    (r"\.conv2\.bn\.", ".f.b_bn."), (r"\.conv3\.conv\.", ".f.c."), (r"\.conv3\.bn\.", ".f.c_bn."),
    (r"\.se\.fc1\.", ".f.se.conv_reduce."), (r"\.se\.fc2\.", ".f.se.conv_expand."),
    (r"\.downsample\.conv\.", ".proj."), (r"\.downsample\.bn\.", ".bn."),
)


default_cfgs = generate_default_cfgs({
    "regnet_x_200mf": _cfg(f"{_MS}/regnet_x_200mf-0c2b1eb5.ckpt"),
    "regnet_x_400mf": _cfg(f"{_MS}/regnet_x_400mf-4848837d.ckpt"),
    "regnet_x_600mf": _cfg(f"{_MS}/regnet_x_600mf-ccd76c94.ckpt"),
    "regnet_x_800mf": _cfg(f"{_MS}/regnet_x_800mf-617227f4.ckpt"),
    "regnet_x_1_6gf": _cfg(),
    "regnet_x_3_2gf": _cfg(),
    "regnet_x_4_0gf": _cfg(),
    "regnet_x_6_4gf": _cfg(),
    "regnet_x_8_0gf": _cfg(),
    "regnet_x_12gf": _cfg(),
    # As in MindCV, whose file name says regnet_y_16gf (a RegNetY checkpoint would not load: its SE weights).
    "regnet_x_16gf": _cfg(f"{_MS}/regnet_y_16gf-c30a856f.ckpt"),
    "regnet_x_32gf": _cfg(),
    "regnet_y_200mf": _cfg(f"{_MS}/regnet_y_200mf-76a2f720.ckpt"),
    "regnet_y_400mf": _cfg(f"{_MS}/regnet_y_400mf-d496799d.ckpt"),
    "regnet_y_600mf": _cfg(f"{_MS}/regnet_y_600mf-a84e19b2.ckpt"),
    "regnet_y_800mf": _cfg(f"{_MS}/regnet_y_800mf-9b5211bd.ckpt"),
    "regnet_y_1_6gf": _cfg(),
    "regnet_y_3_2gf": _cfg(),
    "regnet_y_4_0gf": _cfg(),
    "regnet_y_6_4gf": _cfg(),
    "regnet_y_8_0gf": _cfg(),
    "regnet_y_12gf": _cfg(),
    "regnet_y_16gf": _cfg(),
    "regnet_y_32gf": _cfg(),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES, mindcv_renames=_MINDCV_RENAMES)


@register_model
def regnet_x_200mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_200mf", pretrained, **kwargs)


@register_model
def regnet_x_400mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_400mf", pretrained, **kwargs)


@register_model
def regnet_x_600mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_600mf", pretrained, **kwargs)


@register_model
def regnet_x_800mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_800mf", pretrained, **kwargs)


@register_model
def regnet_x_1_6gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_1_6gf", pretrained, **kwargs)


@register_model
def regnet_x_3_2gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_3_2gf", pretrained, **kwargs)


@register_model
def regnet_x_4_0gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_4_0gf", pretrained, **kwargs)


@register_model
def regnet_x_6_4gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_6_4gf", pretrained, **kwargs)


@register_model
def regnet_x_8_0gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_8_0gf", pretrained, **kwargs)


@register_model
def regnet_x_12gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_12gf", pretrained, **kwargs)


@register_model
def regnet_x_16gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_16gf", pretrained, **kwargs)


@register_model
def regnet_x_32gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_x_32gf", pretrained, **kwargs)


@register_model
def regnet_y_200mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_200mf", pretrained, **kwargs)


@register_model
def regnet_y_400mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_400mf", pretrained, **kwargs)


@register_model
def regnet_y_600mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_600mf", pretrained, **kwargs)


@register_model
def regnet_y_800mf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_800mf", pretrained, **kwargs)


@register_model
def regnet_y_1_6gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_1_6gf", pretrained, **kwargs)


@register_model
def regnet_y_3_2gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_3_2gf", pretrained, **kwargs)


@register_model
def regnet_y_4_0gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_4_0gf", pretrained, **kwargs)


@register_model
def regnet_y_6_4gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_6_4gf", pretrained, **kwargs)


@register_model
def regnet_y_8_0gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_8_0gf", pretrained, **kwargs)


@register_model
def regnet_y_12gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_12gf", pretrained, **kwargs)


@register_model
def regnet_y_16gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_16gf", pretrained, **kwargs)


@register_model
def regnet_y_32gf(pretrained: bool = False, **kwargs) -> RegNet:
    return _create_regnet("regnet_y_32gf", pretrained, **kwargs)
