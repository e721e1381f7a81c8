"""EfficientNet (B0-B7) and EfficientNetV2 (S/M/L/XL), with MindCV's module tree and parameter names.

`EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks <https://arxiv.org/abs/1905.11946>`_
and `EfficientNetV2: Smaller Models and Faster Training <https://arxiv.org/abs/2104.00298>`_.

MindCV details kept here:

* Everything is one ``features`` sequence: stem conv/BN/Swish, one
  ``nn.Sequential`` per stage, head 1x1 conv/BN/Swish; then ``avgpool``,
  ``dropout`` and the classifier ``mlp_head``.
* ``feature_info`` has one entry per stage (not per block), plus the stem's and
  the head conv's activations, so two entries may share a reduction (e.g. B0's
  ``features.2`` and ``features.3`` at 2). ``out_indices="pyramid"`` picks the
  last of each, which at stride 32 is the 1x1 head conv (1280 channels for B0).
* Every conv uses MindSpore's ``same`` padding: asymmetric for the stride-2
  depthwise (MBConv) and full (FusedMBConv, stem) convs on even inputs.
* BatchNorm is MindSpore's default (eps 1e-5, momentum 0.9 = PyTorch 0.1),
  except for width multipliers >= 1.6 (B5, B6, B7): eps 1e-3, momentum 0.99
  (= PyTorch 0.01). EfficientNetV2 keeps the default, unlike the TF original.
* The squeeze-excite width is a quarter of the block's *input* channels
  (not of the expanded ones); FusedMBConv has no squeeze-excite.
* Stochastic depth grows linearly with the block index (``drop_path_prob``
  times index / number of blocks), acts on residual blocks only, and is the
  identity in eval.

``output_stride=16`` (or 8) turns the stage strides that would pass it into
dilation, as timm's EfficientNet builder does: the stage's first block (the one
that loses its stride) keeps the dilation before it, the blocks after take the
new one. ``feature_info`` keeps its entries, with the real reductions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.activation import Swish
from ..layers.drop_path import DropPath
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import fan_out_normal, init_weights, inv_sqrt_out_uniform
from ..layers.padding import Conv2d
from ..layers.pooling import GlobalAvgPooling
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["EfficientNet", "MBConv", "FusedMBConv", "StageCfg"]

NormLayer = Callable[[int], nn.Module]
_CHANNEL_DIVISOR = 8
# MindCV switches to TF-like BatchNorm settings from this width multiplier on (B5..B7).
_WIDE_MODEL_WIDTH = 1.6


@dataclass(frozen=True)
class StageCfg:
    """A stage of ``num_layers`` blocks; only the first has ``stride`` and ``in_chs`` input channels."""

    fused: bool
    expand_ratio: float
    kernel_size: int
    stride: int
    in_chs: int
    out_chs: int
    num_layers: int

    def scaled(self, width_mult: float, depth_mult: float) -> "StageCfg":
        return replace(self, in_chs=make_divisible(self.in_chs * width_mult, _CHANNEL_DIVISOR),
                       out_chs=make_divisible(self.out_chs * width_mult, _CHANNEL_DIVISOR),
                       num_layers=int(math.ceil(self.num_layers * depth_mult)))


def _expanded(in_chs: int, expand_ratio: float) -> int:
    return make_divisible(in_chs * expand_ratio, _CHANNEL_DIVISOR)


class _Residual(nn.Module):
    """``block(x)`` (``layers`` in sequence), plus ``x`` after stochastic depth (``dropout``) where ``shortcut``."""

    def __init__(self, layers: List[nn.Module], shortcut: bool, drop_path_prob: float, out_chs: int):
        super().__init__()
        self.shortcut = shortcut
        self.block = nn.Sequential(*layers)
        self.dropout = DropPath(drop_path_prob)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.dropout(out) + x if self.shortcut else out


class MBConv(_Residual):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> squeeze-excite -> 1x1 project.

    ``block`` holds the layers in MindCV's order; the expand conv/BN/Swish are
    left out when ``expand_ratio`` keeps the width.
    """

    def __init__(self, in_chs: int, out_chs: int, expand_ratio: float, kernel_size: int, stride: int,
                 drop_path_prob: float, norm: NormLayer, dilation: int = 1):
        mid_chs = _expanded(in_chs, expand_ratio)
        layers: List[nn.Module] = []
        if mid_chs != in_chs:
            layers += [Conv2d(in_chs, mid_chs, 1), norm(mid_chs), Swish(inplace=True)]
        layers += [
            Conv2d(mid_chs, mid_chs, kernel_size, stride, dilation=dilation, group=mid_chs), norm(mid_chs),
            Swish(inplace=True),
            SqueezeExcite(mid_chs, rd_channels=max(1, in_chs // 4), act_layer=Swish),
            Conv2d(mid_chs, out_chs, 1), norm(out_chs),
        ]
        super().__init__(layers, stride == 1 and in_chs == out_chs, drop_path_prob, out_chs)


class FusedMBConv(_Residual):
    """EfficientNetV2's fused block: kxk expand conv -> 1x1 project, or a single
    kxk conv/BN/Swish when ``expand_ratio`` keeps the width."""

    def __init__(self, in_chs: int, out_chs: int, expand_ratio: float, kernel_size: int, stride: int,
                 drop_path_prob: float, norm: NormLayer, dilation: int = 1):
        if stride not in (1, 2):
            raise ValueError(f"FusedMBConv: stride must be 1 or 2, got {stride!r}")
        mid_chs = _expanded(in_chs, expand_ratio)
        if mid_chs != in_chs:
            layers: List[nn.Module] = [Conv2d(in_chs, mid_chs, kernel_size, stride, dilation=dilation), norm(mid_chs),
                                       Swish(inplace=True), Conv2d(mid_chs, out_chs, 1), norm(out_chs)]
        else:
            layers = [Conv2d(in_chs, out_chs, kernel_size, stride, dilation=dilation), norm(out_chs),
                      Swish(inplace=True)]
        super().__init__(layers, stride == 1 and in_chs == out_chs, drop_path_prob, out_chs)


def _entry(chs: int, reduction: int, nominal: int, name: str) -> dict:
    """A ``feature_info`` entry; past the stem it names its stage, from its reduction at output_stride 32
    (``nominal``): 4 -> 1, 8 -> 2, 16 -> 3, 32 -> 4."""
    entry = dict(chs=chs, reduction=reduction, name=name)
    if nominal >= 4:
        entry["stage"] = nominal.bit_length() - 2
    return entry


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNetV2 classifier.

    ``feature_info``: the stem's Swish (``features.2``), every stage
    (``features.3`` ...), and the head conv's Swish (the last of ``features``);
    past the stem, ``stage`` numbers them by stride (4 -> 1 ... 32 -> 4).

    Args:
        stages: the unscaled stage table (``StageCfg`` per stage).
        width_mult, depth_mult: compound scaling of channels and blocks per stage.
        dropout_rate: dropout before the classifier.
        head_chs: channels of the 1x1 head conv; ``None`` for 4x the last stage's.
        num_classes, in_channels: classifier outputs, input channels.
        drop_path_prob: stochastic depth rate of the deepest block.
        norm_layer: normalisation class; ``None`` for MindCV's choice by width.
        output_stride: 32, or 16 / 8 to dilate the stages past that stride instead of striding.

    >>> m = EfficientNet(_B_STAGES)
    >>> m(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    """

    def __init__(self, stages: Sequence[StageCfg], width_mult: float = 1.0, depth_mult: float = 1.0,
                 dropout_rate: float = 0.2, head_chs: Optional[int] = None, num_classes: int = 1000,
                 in_channels: int = 3, drop_path_prob: float = 0.2, norm_layer: Optional[NormLayer] = None,
                 output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"EfficientNet: output_stride must be 8, 16 or 32, got {output_stride!r}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
            if width_mult >= _WIDE_MODEL_WIDTH:
                norm_layer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
        stages = [s.scaled(width_mult, depth_mult) for s in stages]

        stem_chs = stages[0].in_chs
        # In-place activations: each follows a norm whose output no feature entry names.
        layers: List[nn.Module] = [Conv2d(in_channels, stem_chs, 3, 2), norm_layer(stem_chs), Swish(inplace=True)]
        nominal = reduction = total_stride(*layers)  # nominal: the reduction at output_stride 32
        self.feature_info = [_entry(stem_chs, reduction, nominal, f"features.{len(layers) - 1}")]

        num_blocks = sum(s.num_layers for s in stages)
        block_idx, dilation = 0, 1
        for s in stages:
            block_cls = FusedMBConv if s.fused else MBConv
            stride, first_dilation = s.stride, dilation
            if reduction * s.stride > output_stride:
                stride, dilation = 1, dilation * s.stride
            blocks: List[nn.Module] = []
            for i in range(s.num_layers):
                first = i == 0
                blocks.append(block_cls(s.in_chs if first else s.out_chs, s.out_chs, s.expand_ratio, s.kernel_size,
                                        stride if first else 1, drop_path_prob * block_idx / num_blocks,
                                        norm_layer, first_dilation if first else dilation))
                block_idx += 1
            reduction, nominal = reduction * stride, nominal * s.stride
            layers.append(nn.Sequential(*blocks))
            self.feature_info.append(_entry(s.out_chs, reduction, nominal, f"features.{len(layers) - 1}"))

        self.num_features = head_chs or 4 * stages[-1].out_chs
        layers += [Conv2d(stages[-1].out_chs, self.num_features, 1), norm_layer(self.num_features),
                   Swish(inplace=True)]
        self.feature_info.append(_entry(self.num_features, reduction, nominal, f"features.{len(layers) - 1}"))

        self.features = nn.Sequential(*layers)
        self.avgpool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=dropout_rate)
        self.mlp_head = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=inv_sqrt_out_uniform)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.dropout(self.avgpool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_efficientnet(variant: str, pretrained: bool = False, **kwargs) -> EfficientNet:
    return build_model_with_cfg(EfficientNet, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def _mb(expand_ratio: float, kernel_size: int, stride: int, in_chs: int, out_chs: int, num_layers: int) -> StageCfg:
    return StageCfg(False, expand_ratio, kernel_size, stride, in_chs, out_chs, num_layers)


def _fused(expand_ratio: float, kernel_size: int, stride: int, in_chs: int, out_chs: int,
           num_layers: int) -> StageCfg:
    return StageCfg(True, expand_ratio, kernel_size, stride, in_chs, out_chs, num_layers)


# (expand_ratio, kernel, stride, in, out, blocks), before width/depth scaling.
_B_STAGES = (
    _mb(1, 3, 1, 32, 16, 1), _mb(6, 3, 2, 16, 24, 2), _mb(6, 5, 2, 24, 40, 2), _mb(6, 3, 2, 40, 80, 3),
    _mb(6, 5, 1, 80, 112, 3), _mb(6, 5, 2, 112, 192, 4), _mb(6, 3, 1, 192, 320, 1),
)
_V2_S_STAGES = (
    _fused(1, 3, 1, 24, 24, 2), _fused(4, 3, 2, 24, 48, 4), _fused(4, 3, 2, 48, 64, 4),
    _mb(4, 3, 2, 64, 128, 6), _mb(6, 3, 1, 128, 160, 9), _mb(6, 3, 2, 160, 256, 15),
)
_V2_M_STAGES = (
    _fused(1, 3, 1, 24, 24, 3), _fused(4, 3, 2, 24, 48, 5), _fused(4, 3, 2, 48, 80, 5),
    _mb(4, 3, 2, 80, 160, 7), _mb(6, 3, 1, 160, 176, 14), _mb(6, 3, 2, 176, 304, 18), _mb(6, 3, 1, 304, 512, 5),
)
_V2_L_STAGES = (
    _fused(1, 3, 1, 32, 32, 4), _fused(4, 3, 2, 32, 64, 7), _fused(4, 3, 2, 64, 96, 7),
    _mb(4, 3, 2, 96, 192, 10), _mb(6, 3, 1, 192, 224, 19), _mb(6, 3, 2, 224, 384, 25), _mb(6, 3, 1, 384, 640, 7),
)
_V2_XL_STAGES = (
    _fused(1, 3, 1, 32, 32, 4), _fused(4, 3, 2, 32, 64, 8), _fused(4, 3, 2, 64, 96, 8),
    _mb(4, 3, 2, 96, 192, 16), _mb(6, 3, 1, 192, 256, 24), _mb(6, 3, 2, 256, 512, 32), _mb(6, 3, 1, 512, 640, 8),
)
_V2_HEAD_CHS = 1280


@dataclass(frozen=True)
class EfficientNetCfg:
    """A variant: stage table, compound scaling (width, depth), classifier dropout, head width."""

    stages: Tuple[StageCfg, ...]
    width_mult: float = 1.0
    depth_mult: float = 1.0
    dropout_rate: float = 0.2
    head_chs: Optional[int] = None


model_cfgs = dict(
    efficientnet_b0=EfficientNetCfg(_B_STAGES, 1.0, 1.0, 0.2),
    efficientnet_b1=EfficientNetCfg(_B_STAGES, 1.0, 1.1, 0.2),
    efficientnet_b2=EfficientNetCfg(_B_STAGES, 1.1, 1.2, 0.3),
    efficientnet_b3=EfficientNetCfg(_B_STAGES, 1.2, 1.4, 0.3),
    efficientnet_b4=EfficientNetCfg(_B_STAGES, 1.4, 1.8, 0.4),
    efficientnet_b5=EfficientNetCfg(_B_STAGES, 1.6, 2.2, 0.4),
    efficientnet_b6=EfficientNetCfg(_B_STAGES, 1.8, 2.6, 0.5),
    efficientnet_b7=EfficientNetCfg(_B_STAGES, 2.0, 3.1, 0.5),
    efficientnet_v2_s=EfficientNetCfg(_V2_S_STAGES, head_chs=_V2_HEAD_CHS),
    efficientnet_v2_m=EfficientNetCfg(_V2_M_STAGES, head_chs=_V2_HEAD_CHS),
    efficientnet_v2_l=EfficientNetCfg(_V2_L_STAGES, head_chs=_V2_HEAD_CHS),
    efficientnet_v2_xl=EfficientNetCfg(_V2_XL_STAGES, head_chs=_V2_HEAD_CHS),
)


def _cfg(url: str = "", **kwargs):
    # MindCV names no first_conv (its commented-out one is not a module); ours is the stem conv.
    return dict(url=url, num_classes=1000, first_conv="features.0", classifier="mlp_head",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters. B0-B4 and V2 use BatchNorm eps 1e-5 here, as timm's
# efficientnet_b*/efficientnetv2_* (which pad symmetrically, so they compute what we do where MindSpore's
# "same" padding is symmetric: odd inputs to every stride-2 conv, e.g. 65 px); timm's tf_* twins would pad
# as we do but use eps 1e-3. B5-B7 use eps 1e-3 here, as tf_efficientnet_b5-b7, whose TF "same" padding is
# MindSpore's: those compute what we do at every size. (All of them load: the names are the same.)
_TIMM_TWINS = {
    **{f"efficientnet_b{i}": f"efficientnet_b{i}" for i in range(5)},
    **{f"efficientnet_b{i}": f"tf_efficientnet_b{i}" for i in range(5, 8)},
    **{f"efficientnet_v2_{s}": f"efficientnetv2_{s}" for s in ("s", "m", "l", "xl")},
}

# Layer positions inside our block.* sequence, per timm block type (told apart by its parameter names).
_TIMM_BLOCK_LAYERS = {
    "ir": {"conv_pw": 0, "bn1": 1, "conv_dw": 3, "bn2": 4, "se": 6, "conv_pwl": 7, "bn3": 8},  # MBConv
    "ds": {"conv_dw": 0, "bn1": 1, "se": 3, "conv_pw": 4, "bn2": 5},  # MBConv without expansion
    "er": {"conv_exp": 0, "bn1": 1, "conv_pwl": 3, "bn2": 4},  # FusedMBConv
    "cn": {"conv": 0, "bn1": 1},  # FusedMBConv without expansion
}

def _convert_from_timm(state_dict):
    """timm's EfficientNet names as ours: ``blocks.<stage>.<i>`` is ``features.<3 + stage>.<i>.block``;
    the head conv/BN follow the last stage. Names that are not timm's pass unchanged."""
    import re

    block_re = re.compile(r"^blocks\.(\d+)\.(\d+)\.([a-z_]+\d?)\.(.+)$")
    blocks = {}
    for name in state_dict:
        m = block_re.match(name)
        if m:
            blocks.setdefault(m.group(1, 2), set()).add(m.group(3))
    head = 3 + len({stage for stage, _ in blocks})
    top = {"conv_stem": "features.0", "bn1": "features.1", "conv_head": f"features.{head}",
           "bn2": f"features.{head + 1}", "classifier": "mlp_head"}
    out = {}
    for name, tensor in state_dict.items():
        m = block_re.match(name)
        if m:
            parts = blocks[m.group(1, 2)]
            kind = ("ir" if "conv_pwl" in parts and "conv_dw" in parts else "ds" if "conv_dw" in parts
                    else "er" if "conv_exp" in parts else "cn")
            pos = _TIMM_BLOCK_LAYERS[kind].get(m.group(3))
            if pos is not None:
                name = f"features.{3 + int(m.group(1))}.{m.group(2)}.block.{pos}.{m.group(4)}"
        else:
            first, _, rest = name.partition(".")
            if first in top and rest:
                name = f"{top[first]}.{rest}"
        out[name] = tensor
    return out


default_cfgs = generate_default_cfgs({
    "efficientnet_b0": _cfg(f"{_MS}/efficientnet/efficientnet_b0-103ec70c.ckpt"),
    "efficientnet_b1": _cfg(f"{_MS}/efficientnet/efficientnet_b1-f8c6b13f.ckpt"),
    "efficientnet_b2": _cfg(),
    "efficientnet_b3": _cfg(),
    "efficientnet_b4": _cfg(),
    "efficientnet_b5": _cfg(),
    "efficientnet_b6": _cfg(),
    "efficientnet_b7": _cfg(),
    "efficientnet_v2_s": _cfg(),
    "efficientnet_v2_m": _cfg(),
    "efficientnet_v2_l": _cfg(),
    "efficientnet_v2_xl": _cfg(),
}, timm_twins=_TIMM_TWINS, timm_convert=_convert_from_timm)


@register_model
def efficientnet_b0(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b0", pretrained, **kwargs)


@register_model
def efficientnet_b1(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b1", pretrained, **kwargs)


@register_model
def efficientnet_b2(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b2", pretrained, **kwargs)


@register_model
def efficientnet_b3(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b3", pretrained, **kwargs)


@register_model
def efficientnet_b4(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b4", pretrained, **kwargs)


@register_model
def efficientnet_b5(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b5", pretrained, **kwargs)


@register_model
def efficientnet_b6(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b6", pretrained, **kwargs)


@register_model
def efficientnet_b7(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_b7", pretrained, **kwargs)


@register_model
def efficientnet_v2_s(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_v2_s", pretrained, **kwargs)


@register_model
def efficientnet_v2_m(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_v2_m", pretrained, **kwargs)


@register_model
def efficientnet_v2_l(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_v2_l", pretrained, **kwargs)


@register_model
def efficientnet_v2_xl(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _create_efficientnet("efficientnet_v2_xl", pretrained, **kwargs)
