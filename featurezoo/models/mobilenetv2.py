"""MobileNetV2, with MindCV's module tree and parameter names.

`MobileNetV2: Inverted Residuals and Linear Bottlenecks <https://arxiv.org/abs/1801.04381>`_.
Everything up to the last 1x1 conv is one ``features`` sequence (stem
conv/bn/ReLU6, one ``InvertedResidual`` per block, head conv/bn/ReLU6), so
``feature_info`` has one entry per block as in MindCV and feature extraction
needs no forward code. All convs pad symmetrically (MindCV uses ``pad_mode="pad"``
throughout). The ``_192``/``_160``/... variants differ from the plain ones only
in the resolution their (unpublished) weights were meant for.

``output_stride=16`` (or 8) turns the strides that would pass it into dilation,
with timm's EfficientNet-builder rule (which timm's ``mobilenetv2_*`` use): the
block that loses its stride keeps the dilation before it, the blocks after take
the new one. ``feature_info`` keeps its entries, with the real reductions.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import fan_out_normal, init_weights, normal
from ..registry import register_model

__all__ = ["MobileNetV2", "InvertedResidual"]

# expansion t, output channels c, blocks n, stride of the first block s
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand (if ``expand_ratio`` > 1), 3x3 depthwise, linear 1x1 project;
    residual when the block keeps both stride and channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden_dim = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels

        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_channels, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride, padding=dilation, dilation=dilation, groups=hidden_dim,
                      bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU6(),
            nn.Conv2d(hidden_dim, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
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


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier; ``feature_info``: the stem's ReLU6, every
    ``InvertedResidual`` and the last 1x1 conv's ReLU6 (``features.*``).

    Args:
        alpha: width multiplier (the head widens only for ``alpha`` > 1).
        round_nearest: channel counts are multiples of this.
        in_channels, num_classes: input channels, classifier outputs.
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, alpha: float = 1.0, round_nearest: int = 8, in_channels: int = 3, num_classes: int = 1000,
                 output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MobileNetV2: output_stride must be 8, 16 or 32, got {output_stride!r}")
        input_channels = make_divisible(32 * alpha, round_nearest)
        last_channels = make_divisible(1280 * max(1.0, alpha), round_nearest)

        features: List[nn.Module] = [
            nn.Conv2d(in_channels, input_channels, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(input_channels),
            nn.ReLU6(),
        ]
        nominal = reduction = total_stride(*features)  # nominal: the reduction at output_stride 32
        dilation = 1
        self.feature_info = [_entry(input_channels, reduction, nominal, f"features.{len(features) - 1}")]
        for t, c, n, s in _SETTING:
            out_channels = make_divisible(c * alpha, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                nominal *= stride
                block_stride, block_dilation = stride, dilation
                if reduction * stride > output_stride:
                    block_stride, dilation = 1, dilation * stride
                features.append(InvertedResidual(input_channels, out_channels, block_stride, t, block_dilation))
                input_channels = out_channels
                reduction *= block_stride
                self.feature_info.append(_entry(out_channels, reduction, nominal, f"features.{len(features) - 1}"))
        features += [nn.Conv2d(input_channels, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                     nn.ReLU6()]
        self.feature_info.append(_entry(last_channels, reduction, nominal, f"features.{len(features) - 1}"))
        self.features = nn.Sequential(*features)

        self.pool = GlobalAvgPooling()
        self.num_features = last_channels
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last_channels, num_classes))
        init_weights(self, conv=fan_out_normal, linear=normal(0.01))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mobilenet_v2(variant: str, pretrained: bool = False, **kwargs) -> MobileNetV2:
    return build_model_with_cfg(MobileNetV2, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.0", classifier="classifier.1",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/mobilenet/mobilenetv2"
# timm models with the same architecture and parameters (the resolution variants share their width's
# twin; timm has no width 1.3). Both pad every conv symmetrically: the numbers agree at any input size.
_TIMM_TWINS = {
    **{f"mobilenet_v2_{w}{r}": f"mobilenetv2_{w}" for w, rs in (
        ("140", ("",)), ("100", ("", "_192", "_160", "_128", "_96")), ("075", ("", "_192", "_160", "_128", "_96")),
        ("050", ("_224", "_192", "_160", "_128", "_96")), ("035", ("_224", "_192", "_160", "_128", "_96")))
       for r in rs},
}

# timm's blocks.<stage>.<i> are features.<3 + block number> here (the stem is features.0-2); its first block
# (depthwise-separable, no expansion) names its layers differently from the inverted residuals.
_TIMM_RENAMES = (
    (r"^conv_stem\.", "features.0."), (r"^bn1\.", "features.1."),
    (r"^conv_head\.", "features.20."), (r"^bn2\.", "features.21."), (r"^classifier\.", "classifier.1."),
    (r"^blocks\.0\.0\.conv_dw\.", "features.3.layers.0."), (r"^blocks\.0\.0\.bn1\.", "features.3.layers.1."),
    (r"^blocks\.0\.0\.conv_pw\.", "features.3.layers.3."), (r"^blocks\.0\.0\.bn2\.", "features.3.layers.4."),
    (r"^(blocks\.\d+\.\d+\.)conv_pw\.", r"\1layers.0."), (r"^(blocks\.\d+\.\d+\.)bn1\.", r"\1layers.1."),
    (r"^(blocks\.\d+\.\d+\.)conv_dw\.", r"\1layers.3."), (r"^(blocks\.\d+\.\d+\.)bn2\.", r"\1layers.4."),
    (r"^(blocks\.\d+\.\d+\.)conv_pwl\.", r"\1layers.6."), (r"^(blocks\.\d+\.\d+\.)bn3\.", r"\1layers.7."),
    *((rf"^blocks\.{s}\.{i}\.", f"features.{3 + b}.") for b, (s, i) in enumerate(
        (s, i) for s, (_, _, n, _) in enumerate(_SETTING) for i in range(n))),
)


default_cfgs = generate_default_cfgs({
    "mobilenet_v2_140": _cfg(f"{_MS}/mobilenet_v2_140-98776171.ckpt"),
    "mobilenet_v2_130_224": _cfg(),
    "mobilenet_v2_100": _cfg(f"{_MS}/mobilenet_v2_100-d5532038.ckpt"),
    "mobilenet_v2_100_192": _cfg(),
    "mobilenet_v2_100_160": _cfg(),
    "mobilenet_v2_100_128": _cfg(),
    "mobilenet_v2_100_96": _cfg(),
    "mobilenet_v2_075": _cfg(f"{_MS}/mobilenet_v2_075-bd7bd4c4.ckpt"),
    "mobilenet_v2_075_192": _cfg(),
    "mobilenet_v2_075_160": _cfg(),
    "mobilenet_v2_075_128": _cfg(),
    "mobilenet_v2_075_96": _cfg(),
    "mobilenet_v2_050_224": _cfg(),
    "mobilenet_v2_050_192": _cfg(),
    "mobilenet_v2_050_160": _cfg(),
    "mobilenet_v2_050_128": _cfg(),
    "mobilenet_v2_050_96": _cfg(),
    "mobilenet_v2_035_224": _cfg(),
    "mobilenet_v2_035_192": _cfg(),
    "mobilenet_v2_035_160": _cfg(),
    "mobilenet_v2_035_128": _cfg(),
    "mobilenet_v2_035_96": _cfg(),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def mobilenet_v2_140(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_140", pretrained, alpha=1.4, **kwargs)


@register_model
def mobilenet_v2_130_224(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_130_224", pretrained, alpha=1.3, **kwargs)


@register_model
def mobilenet_v2_100(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_100", pretrained, alpha=1.0, **kwargs)


@register_model
def mobilenet_v2_100_192(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_100_192", pretrained, alpha=1.0, **kwargs)


@register_model
def mobilenet_v2_100_160(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_100_160", pretrained, alpha=1.0, **kwargs)


@register_model
def mobilenet_v2_100_128(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_100_128", pretrained, alpha=1.0, **kwargs)


@register_model
def mobilenet_v2_100_96(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_100_96", pretrained, alpha=1.0, **kwargs)


@register_model
def mobilenet_v2_075(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_075", pretrained, alpha=0.75, **kwargs)


@register_model
def mobilenet_v2_075_192(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_075_192", pretrained, alpha=0.75, **kwargs)


@register_model
def mobilenet_v2_075_160(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_075_160", pretrained, alpha=0.75, **kwargs)


@register_model
def mobilenet_v2_075_128(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_075_128", pretrained, alpha=0.75, **kwargs)


@register_model
def mobilenet_v2_075_96(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_075_96", pretrained, alpha=0.75, **kwargs)


@register_model
def mobilenet_v2_050_224(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_050_224", pretrained, alpha=0.5, **kwargs)


@register_model
def mobilenet_v2_050_192(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_050_192", pretrained, alpha=0.5, **kwargs)


@register_model
def mobilenet_v2_050_160(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_050_160", pretrained, alpha=0.5, **kwargs)


@register_model
def mobilenet_v2_050_128(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_050_128", pretrained, alpha=0.5, **kwargs)


@register_model
def mobilenet_v2_050_96(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_050_96", pretrained, alpha=0.5, **kwargs)


@register_model
def mobilenet_v2_035_224(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_035_224", pretrained, alpha=0.35, **kwargs)


@register_model
def mobilenet_v2_035_192(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_035_192", pretrained, alpha=0.35, **kwargs)


@register_model
def mobilenet_v2_035_160(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_035_160", pretrained, alpha=0.35, **kwargs)


@register_model
def mobilenet_v2_035_128(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_035_128", pretrained, alpha=0.35, **kwargs)


@register_model
def mobilenet_v2_035_96(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _create_mobilenet_v2("mobilenet_v2_035_96", pretrained, alpha=0.35, **kwargs)
