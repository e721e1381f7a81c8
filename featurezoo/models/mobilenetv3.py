"""MobileNetV3 (small and large), with MindCV's module tree and parameter names.

`Searching for MobileNetV3 <https://arxiv.org/abs/1905.02244>`_. Everything up
to the last 1x1 conv is one ``features`` sequence (stem conv/bn/act, one
``Bottleneck`` per row of the setting, head conv/bn/act), so ``feature_info``
has one entry per block as in MindCV and feature extraction needs no forward
code. Depthwise convs use MindSpore's ``same`` padding (bottom/right heavy at
stride 2); every other conv pads symmetrically.

``output_stride=16`` (or 8) turns the strides that would pass it into dilation,
with timm's EfficientNet-builder rule (which timm's MobileNetV3 uses): the block
that loses its stride keeps the dilation before it, the blocks after take the
new one. ``feature_info`` keeps its entries, with the real reductions.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import Conv2d, GlobalAvgPooling
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import fan_out_normal, init_weights, normal
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["MobileNetV3", "Bottleneck"]

_ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish}

# One row per Bottleneck: depthwise kernel, expansion channels, output channels, SE, activation, stride.
_LARGE = (
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hswish", 2),
    (3, 200, 80, False, "hswish", 1),
    (3, 184, 80, False, "hswish", 1),
    (3, 184, 80, False, "hswish", 1),
    (3, 480, 112, True, "hswish", 1),
    (3, 672, 112, True, "hswish", 1),
    (5, 672, 160, True, "hswish", 2),
    (5, 960, 160, True, "hswish", 1),
    (5, 960, 160, True, "hswish", 1),
)
_SMALL = (
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hswish", 2),
    (5, 240, 40, True, "hswish", 1),
    (5, 240, 40, True, "hswish", 1),
    (5, 120, 48, True, "hswish", 1),
    (5, 144, 48, True, "hswish", 1),
    (5, 288, 96, True, "hswish", 2),
    (5, 576, 96, True, "hswish", 1),
    (5, 576, 96, True, "hswish", 1),
)
# arch -> (bottleneck setting, classifier hidden width before scaling)
_ARCHS = {"large": (_LARGE, 1280), "small": (_SMALL, 1024)}


class Bottleneck(nn.Module):
    """Inverted residual: optional 1x1 expand, depthwise conv, optional SE, 1x1 project.

    The residual is added when the block keeps both stride and channels.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 activation: str = "relu", use_se: bool = False, dilation: int = 1):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; valid: {sorted(_ACTIVATIONS)}")
        self.use_se = use_se
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.activation = _ACTIVATIONS[activation]

        layers: List[nn.Module] = []
        if in_channels != mid_channels:
            layers += [nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels),
                       self.activation(inplace=True)]
        layers += [Conv2d(mid_channels, mid_channels, kernel_size, stride, pad_mode="same", dilation=dilation,
                          group=mid_channels),
                   nn.BatchNorm2d(mid_channels), self.activation(inplace=True)]
        if use_se:
            layers.append(SqueezeExcite(mid_channels, 1.0 / 4, act_layer=nn.ReLU, gate_layer=nn.Hardsigmoid))
        layers += [nn.Conv2d(mid_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.layers(x)
        return self.layers(x)


def _entry(chs: int, reduction: int, nominal: int, name: str) -> dict:
    """A ``feature_info`` entry; past the stem it names its stage, from its reduction at output_stride 32
    (``nominal``): 4 -> 1, 8 -> 2, 16 -> 3, 32 -> 4."""
    entry = dict(chs=chs, reduction=reduction, name=name)
    if nominal >= 4:
        entry["stage"] = nominal.bit_length() - 2
    return entry


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier; ``feature_info``: the stem's activation, every
    ``Bottleneck`` and the last 1x1 conv's activation (``features.*``).

    Args:
        arch: ``"small"`` or ``"large"``.
        alpha: width multiplier.
        round_nearest: channel counts are multiples of this.
        in_channels, num_classes: input channels, classifier outputs.
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, arch: str, alpha: float = 1.0, round_nearest: int = 8, in_channels: int = 3,
                 num_classes: int = 1000, output_stride: int = 32):
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"arch={arch!r}; valid: {sorted(_ARCHS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MobileNetV3: output_stride must be 8, 16 or 32, got {output_stride!r}")
        setting, last_width = _ARCHS[arch]
        input_channels = make_divisible(16 * alpha, round_nearest)
        last_channels = make_divisible(alpha * last_width, round_nearest)

        features: List[nn.Module] = [
            nn.Conv2d(in_channels, input_channels, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(input_channels),
            nn.Hardswish(inplace=True),
        ]
        nominal = reduction = total_stride(*features)  # nominal: the reduction at output_stride 32
        dilation = 1
        self.feature_info = [_entry(input_channels, reduction, nominal, f"features.{len(features) - 1}")]
        for k, e, c, se, nl, s in setting:
            exp_channels = make_divisible(alpha * e, round_nearest)
            out_channels = make_divisible(alpha * c, round_nearest)
            nominal *= s
            stride, block_dilation = s, dilation
            if reduction * s > output_stride:
                stride, dilation = 1, dilation * s
            features.append(Bottleneck(input_channels, exp_channels, out_channels, k, stride, nl, se, block_dilation))
            input_channels = out_channels
            reduction *= stride
            self.feature_info.append(_entry(input_channels, reduction, nominal, f"features.{len(features) - 1}"))
        # MindCV widens the head by 6x the last block (not a scaled 960/576).
        output_channels = input_channels * 6
        features += [nn.Conv2d(input_channels, output_channels, 1, bias=False), nn.BatchNorm2d(output_channels),
                     nn.Hardswish(inplace=True)]
        self.feature_info.append(_entry(output_channels, reduction, nominal, f"features.{len(features) - 1}"))
        self.features = nn.Sequential(*features)

        self.pool = GlobalAvgPooling()
        self.num_features = output_channels
        self.classifier = nn.Sequential(
            nn.Linear(output_channels, last_channels),
            nn.Hardswish(),
            nn.Dropout(p=0.2),
            nn.Linear(last_channels, num_classes),
        )
        init_weights(self, conv=fan_out_normal, linear=normal(0.01))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mobilenet_v3(variant: str, pretrained: bool = False, **kwargs) -> MobileNetV3:
    return build_model_with_cfg(MobileNetV3, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.0", classifier="classifier.3",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/mobilenet/mobilenetv3"
# No timm twins. timm's mobilenetv3_{small,large}_100 (and tf_*) have our parameters, but the
# classifier's hidden layer is a 1x1 conv there (conv_head, 4-D weight) and a Linear here (2-D), so one
# tensor would need a reshape; timm's *_075 models also keep that layer 1280 (large) / 1024 (small) wide,
# where MindCV scales it to 960 / 768.
_TIMM_TWINS: dict = {}


default_cfgs = generate_default_cfgs({
    "mobilenet_v3_small_100": _cfg(f"{_MS}/mobilenet_v3_small_100-509c6047.ckpt"),
    "mobilenet_v3_large_100": _cfg(f"{_MS}/mobilenet_v3_large_100-1279ad5f.ckpt"),
    "mobilenet_v3_small_075": _cfg(),
    "mobilenet_v3_large_075": _cfg(),
}, timm_twins=_TIMM_TWINS)


@register_model
def mobilenet_v3_small_100(pretrained: bool = False, **kwargs) -> MobileNetV3:
    return _create_mobilenet_v3("mobilenet_v3_small_100", pretrained, arch="small", alpha=1.0, **kwargs)


@register_model
def mobilenet_v3_large_100(pretrained: bool = False, **kwargs) -> MobileNetV3:
    return _create_mobilenet_v3("mobilenet_v3_large_100", pretrained, arch="large", alpha=1.0, **kwargs)


@register_model
def mobilenet_v3_small_075(pretrained: bool = False, **kwargs) -> MobileNetV3:
    return _create_mobilenet_v3("mobilenet_v3_small_075", pretrained, arch="small", alpha=0.75, **kwargs)


@register_model
def mobilenet_v3_large_075(pretrained: bool = False, **kwargs) -> MobileNetV3:
    return _create_mobilenet_v3("mobilenet_v3_large_075", pretrained, arch="large", alpha=0.75, **kwargs)
