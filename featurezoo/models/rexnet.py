"""ReXNet (v1), with MindCV's module tree and parameter names.

`ReXNet: Rethinking Channel Dimensions for Efficient Model Design
<https://arxiv.org/abs/2007.00992>`_. Inverted-residual blocks whose output
width grows linearly with depth; a residual adds the input to the first
``in_channels`` channels of the (wider) output. The stem, every block, the
1x1 "penultimate" conv and the global pooling all sit in ``features``
(MindCV's layout), so the model is sequential and the feature wrapper enters
``features`` by its dotted names.

``output_stride=16`` (or 8) follows timm's ReXNet: a block whose stride would
pass it keeps stride 1 and the dilation before it (and, as in timm, no residual,
since its input and output grids differ in dilation); the blocks after take the
new dilation. ``feature_info`` keeps its entries, with the real reductions.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.conv_norm_act import Conv2dNormActivation
from ..layers.drop_path import DropPath
from ..layers.helpers import make_divisible
from ..layers.init import he_uniform, init_weights, inv_sqrt_out_uniform
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["ReXNetV1", "LinearBottleneck"]


class LinearBottleneck(nn.Module):
    """1x1 expand (SiLU) -> 3x3 depthwise -> SE -> ReLU6 -> 1x1 linear projection.

    With stride 1 and ``in_channels <= out_channels`` the input is added to the
    first ``in_channels`` output channels (the extra channels pass unchanged);
    ``dilation``: the depthwise conv's, and that of the blocks after this one
    (different where this block's stride became dilation: no residual then).
    """

    def __init__(self, in_channels: int, out_channels: int, exp_ratio: int, stride: int, use_se: bool = True,
                 se_ratio: float = 1 / 12, ch_div: int = 1, act_layer: Callable[[], nn.Module] = nn.SiLU,
                 dw_act_layer: Callable[[], nn.Module] = nn.ReLU6, drop_path: Optional[nn.Module] = None,
                 dilation: Tuple[int, int] = (1, 1)):
        super().__init__()
        self.use_shortcut = stride == 1 and dilation[0] == dilation[1] and in_channels <= out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        if exp_ratio != 1:
            dw_channels = in_channels * exp_ratio
            self.conv_exp = Conv2dNormActivation(in_channels, dw_channels, 1, activation=act_layer)
        else:
            dw_channels = in_channels
            self.conv_exp = None
        self.conv_dw = Conv2dNormActivation(dw_channels, dw_channels, 3, stride, padding=dilation[0],
                                            dilation=dilation[0], groups=dw_channels, activation=None)
        if use_se:
            self.se = SqueezeExcite(dw_channels, rd_channels=make_divisible(int(dw_channels * se_ratio), ch_div),
                                    norm=nn.BatchNorm2d)
        else:
            self.se = None
        self.act_dw = dw_act_layer()
        self.conv_pwl = Conv2dNormActivation(dw_channels, out_channels, 1, padding=0, activation=None)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.conv_pwl(self.act_dw(x))
        if self.use_shortcut:
            if self.drop_path is not None:
                x = self.drop_path(x)
            # Out of place: the in-place slice add of MindCV would overwrite a tensor autograd may need.
            x = torch.cat([x[:, :self.in_channels] + shortcut, x[:, self.in_channels:]], dim=1)
        return x


def _entry(chs: int, reduction: int, nominal: int, name: str) -> dict:
    """A ``feature_info`` entry; past the stem it names its stage, from its reduction at output_stride 32
    (``nominal``): 4 -> 1, 8 -> 2, 16 -> 3, 32 -> 4."""
    entry = dict(chs=chs, reduction=reduction, name=name)
    if nominal >= 4:
        entry["stage"] = nominal.bit_length() - 2
    return entry


class ReXNetV1(nn.Module):
    """ReXNet classifier; ``feature_info``: the last block before each stride-2 block, and the last block.

    Args:
        in_channels: input channels.
        fi_channels: channels the blocks add in total over the depth.
        initial_channels: output channels of the first block (before ``width_mult``).
        width_mult, depth_mult: width and depth multipliers.
        num_classes: classifier outputs.
        use_se, se_ratio: squeeze-excitation in the blocks of stages 3-6 and its reduction.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly to this value at the last block.
        ch_div: channel divisor of the stem and the penultimate conv.
        act_layer, dw_act_layer: activation of the 1x1 convs, and after the depthwise conv.
        cls_useconv: a 1x1 conv classifier instead of a linear one.
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, in_channels: int = 3, fi_channels: int = 180, initial_channels: int = 16,
                 width_mult: float = 1.0, depth_mult: float = 1.0, num_classes: int = 1000, use_se: bool = True,
                 se_ratio: float = 1 / 12, drop_rate: float = 0.2, drop_path_rate: float = 0.0, ch_div: int = 1,
                 act_layer: Callable[[], nn.Module] = nn.SiLU, dw_act_layer: Callable[[], nn.Module] = nn.ReLU6,
                 cls_useconv: bool = False, output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"ReXNetV1: output_stride must be 8, 16 or 32, got {output_stride!r}")
        layers = [math.ceil(n * depth_mult) for n in (1, 2, 2, 3, 3, 5)]
        stage_strides = (1, 2, 2, 2, 1, 2)
        stage_se = (False, False, True, True, True, True)
        strides = [s for n, first in zip(layers, stage_strides) for s in [first] + [1] * (n - 1)]
        use_ses = [use_se and se for n, se in zip(layers, stage_se) for _ in range(n)]
        exp_ratios = [1] * layers[0] + [6] * sum(layers[1:])
        num_blocks = sum(layers)
        self.depth = num_blocks * 3

        # Below width 1.0 the base widths are scaled up first, so the stem stays at 32 channels.
        stem_channel = 32 / width_mult if width_mult < 1.0 else 32
        inplanes = initial_channels / width_mult if width_mult < 1.0 else initial_channels
        in_chs_group: List[int] = [int(round(stem_channel * width_mult))]
        out_chs_group: List[int] = [int(round(inplanes * width_mult))]
        for _ in range(1, num_blocks):
            in_chs_group.append(int(round(inplanes * width_mult)))
            inplanes += fi_channels / num_blocks
            out_chs_group.append(int(round(inplanes * width_mult)))

        stem_chs = make_divisible(round(stem_channel * width_mult), divisor=ch_div)
        self.stem = Conv2dNormActivation(in_channels, stem_chs, stride=2, padding=1, activation=act_layer)

        self.feature_info = []
        nominal = reduction = 2  # nominal: the reduction at output_stride 32, which gives the stage
        feat_chs, dilation = stem_chs, 1
        features: List[nn.Module] = []
        for idx, (in_c, out_c, exp_ratio, stride, block_se) in enumerate(
                zip(in_chs_group, out_chs_group, exp_ratios, strides, use_ses)):
            next_dilation = dilation
            if stride > 1:
                # The map just before a downsampling block (MindCV's choice of feature levels).
                name = "stem" if idx == 0 else f"features.{idx - 1}"
                self.feature_info.append(_entry(feat_chs, reduction, nominal, name))
                nominal *= stride
                if reduction * stride > output_stride:
                    stride, next_dilation = 1, dilation * stride
            block_dpr = drop_path_rate * idx / (num_blocks - 1)
            # ch_div is not passed on (as in MindCV): SE widths are never rounded.
            features.append(LinearBottleneck(in_c, out_c, exp_ratio, stride, use_se=block_se, se_ratio=se_ratio,
                                             act_layer=act_layer, dw_act_layer=dw_act_layer,
                                             drop_path=DropPath(block_dpr) if block_dpr > 0.0 else None,
                                             dilation=(dilation, next_dilation)))
            reduction *= stride
            feat_chs, dilation = out_c, next_dilation
        self.feature_info.append(_entry(feat_chs, reduction, nominal, f"features.{len(features) - 1}"))

        pen_channels = make_divisible(int(1280 * width_mult), divisor=ch_div)
        features.append(Conv2dNormActivation(feat_chs, pen_channels, kernel_size=1, activation=act_layer))
        features.append(GlobalAvgPooling(keep_dims=True))
        self.features = nn.Sequential(*features)
        self.num_features = pen_channels
        self.useconv = cls_useconv
        if cls_useconv:
            self.cls = nn.Sequential(nn.Dropout(p=drop_rate), nn.Conv2d(pen_channels, num_classes, 1, bias=True))
        else:
            self.cls = nn.Sequential(nn.Dropout(p=drop_rate), nn.Linear(pen_channels, num_classes))
        # MindCV's HeUniform(sqrt(5), relu): the ReLU gain ignores the slope. Its biases are drawn as a (1, C)
        # weight, so their bound is 1 / sqrt(C).
        init_weights(self, conv=he_uniform, linear=he_uniform, bias=inv_sqrt_out_uniform)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.useconv:
            return self.cls(x).flatten(1)
        return self.cls(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_rexnet(variant: str, width_mult: float, pretrained: bool = False, **kwargs) -> ReXNetV1:
    return build_model_with_cfg(ReXNetV1, pretrained, default_cfg=default_cfgs[variant], width_mult=width_mult,
                                **kwargs)


def _cfg(url: str = "", **kwargs):
    # MindCV leaves first_conv and classifier empty; ours name the modules so the head is dropped
    # from feature models and in_channels adaptation finds the stem conv.
    return dict(url=url, num_classes=1000, input_size=(3, 224, 224), first_conv="stem.features.0",
                classifier="cls", output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/rexnet"
# timm models with the same architecture and parameters (timm has no width 0.9). Both pad symmetrically:
# the numbers agree at any input size.
_TIMM_TWINS = {"rexnet_10": "rexnet_100", "rexnet_13": "rexnet_130", "rexnet_15": "rexnet_150",
              "rexnet_20": "rexnet_200"}

_TIMM_RENAMES = (
    (r"^stem\.conv\.", "stem.features.0."), (r"^stem\.bn\.", "stem.features.1."),
    (r"\.(conv_exp|conv_dw|conv_pwl)\.conv\.", r".\1.features.0."),
    (r"\.(conv_exp|conv_dw|conv_pwl)\.bn\.", r".\1.features.1."),
    (r"\.se\.fc1\.", ".se.conv_reduce."), (r"\.se\.fc2\.", ".se.conv_expand."),
    # the penultimate 1x1 conv, the last of timm's features
    (r"^(features\.\d+)\.conv\.", r"\1.features.0."), (r"^(features\.\d+)\.bn\.", r"\1.features.1."),
    (r"^head\.fc\.", "cls.1."),
)


default_cfgs = generate_default_cfgs({
    "rexnet_09": _cfg(f"{_MS}/rexnet_09-da498331.ckpt"),
    "rexnet_10": _cfg(f"{_MS}/rexnet_10-c5fb2dc7.ckpt"),
    "rexnet_13": _cfg(f"{_MS}/rexnet_13-a49c41e5.ckpt"),
    "rexnet_15": _cfg(f"{_MS}/rexnet_15-37a931d3.ckpt"),
    "rexnet_20": _cfg(f"{_MS}/rexnet_20-c5810914.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def rexnet_09(pretrained: bool = False, **kwargs) -> ReXNetV1:
    return _create_rexnet("rexnet_09", 0.9, pretrained, **kwargs)


@register_model
def rexnet_10(pretrained: bool = False, **kwargs) -> ReXNetV1:
    return _create_rexnet("rexnet_10", 1.0, pretrained, **kwargs)


@register_model
def rexnet_13(pretrained: bool = False, **kwargs) -> ReXNetV1:
    return _create_rexnet("rexnet_13", 1.3, pretrained, **kwargs)


@register_model
def rexnet_15(pretrained: bool = False, **kwargs) -> ReXNetV1:
    return _create_rexnet("rexnet_15", 1.5, pretrained, **kwargs)


@register_model
def rexnet_20(pretrained: bool = False, **kwargs) -> ReXNetV1:
    return _create_rexnet("rexnet_20", 2.0, pretrained, **kwargs)
