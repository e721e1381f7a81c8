"""MobileNetV1, with MindCV's module tree and parameter names.

`MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications
<https://arxiv.org/abs/1704.04861>`_. The stem conv/bn/ReLU and one depthwise
separable block per row of the setting form one ``features`` sequence; all
convs pad symmetrically (MindCV's ``pad_mode="pad"``). MindCV has no
``feature_info`` here; ours is the last block at each reduction (2 to 32),
which is also timm's ``mobilenetv1_100`` pyramid. ``output_stride=16`` (or 8)
turns the strides that would pass it into dilation (timm's EfficientNet-builder
rule: the block that loses its stride keeps the dilation before it, the blocks
after take the new one); the entries stay those of the model at stride 32.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.feature_levels import note_feature
from ..layers.helpers import total_stride
from ..layers.init import init_weights, trunc_normal, xavier_uniform
from ..registry import register_model

__all__ = ["MobileNetV1", "depthwise_separable_conv"]

# output channels c, stride of the depthwise conv s
_SETTING = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
    (512, 1), (1024, 2), (1024, 1),
)


def depthwise_separable_conv(inp: int, oup: int, stride: int, dilation: int = 1) -> nn.Sequential:
    """3x3 depthwise conv/bn/ReLU, then 1x1 pointwise conv/bn/ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, padding=dilation, dilation=dilation, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(),
        nn.Conv2d(inp, oup, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 classifier; ``feature_info``: the last block at each reduction (``features.*``).

    Args:
        alpha: width multiplier (channels are ``int(c * alpha)``, as MindCV).
        in_channels, num_classes: input channels, classifier outputs.
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, alpha: float = 1.0, in_channels: int = 3, num_classes: int = 1000, output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MobileNetV1: output_stride must be 8, 16 or 32, got {output_stride!r}")
        input_channels = int(32 * alpha)
        features: List[nn.Module] = [
            nn.Conv2d(in_channels, input_channels, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(input_channels),
            nn.ReLU(),
        ]
        # ``nominal``: the reduction at output_stride 32, which chooses the entries and numbers their stages.
        nominal = reduction = total_stride(*features)
        dilation = 1
        self.feature_info: List[Dict] = []
        note_feature(self.feature_info, input_channels, nominal, f"features.{len(features) - 1}")
        for c, s in _SETTING:
            output_channels = int(c * alpha)
            stride, block_dilation = s, dilation
            if reduction * s > output_stride:
                stride, dilation = 1, dilation * s
            features.append(depthwise_separable_conv(input_channels, output_channels, stride, block_dilation))
            input_channels = output_channels
            reduction, nominal = reduction * stride, nominal * s
            note_feature(self.feature_info, output_channels, nominal, f"features.{len(features) - 1}")
        for entry in self.feature_info:  # the stage of each entry past the stem, then its real reduction
            if entry["reduction"] >= 4:
                entry["stage"] = entry["reduction"].bit_length() - 2
            entry["reduction"] = min(entry["reduction"], output_stride)
        self.features = nn.Sequential(*features)

        self.pool = GlobalAvgPooling()
        self.num_features = input_channels
        self.classifier = nn.Linear(input_channels, num_classes)
        init_weights(self, conv=xavier_uniform, linear=trunc_normal(0.01, -0.02, 0.02))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mobilenet_v1(variant: str, pretrained: bool = False, **kwargs) -> MobileNetV1:
    return build_model_with_cfg(MobileNetV1, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    # MindCV's published MobileNetV1 weights have 1001 classes (background + ImageNet).
    return dict(url=url, num_classes=1001, first_conv="features.0", classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/mobilenet/mobilenetv1"
default_cfgs = generate_default_cfgs({
    "mobilenet_v1_025": _cfg(f"{_MS}/mobilenet_v1_025-d3377fba.ckpt"),
    "mobilenet_v1_050": _cfg(f"{_MS}/mobilenet_v1_050-23e9ddbe.ckpt"),
    "mobilenet_v1_075": _cfg(f"{_MS}/mobilenet_v1_075-5bed0c73.ckpt"),
    "mobilenet_v1_100": _cfg(f"{_MS}/mobilenet_v1_100-91c7b206.ckpt"),
})


# No timm twin: timm's mobilenetv1_100 has the same tensors, but ReLU6 where MindCV has ReLU, so timm's
# weights would compute another function (logits ~25% apart when randomised).


@register_model
def mobilenet_v1_025(pretrained: bool = False, **kwargs) -> MobileNetV1:
    return _create_mobilenet_v1("mobilenet_v1_025", pretrained, alpha=0.25, **kwargs)


@register_model
def mobilenet_v1_050(pretrained: bool = False, **kwargs) -> MobileNetV1:
    return _create_mobilenet_v1("mobilenet_v1_050", pretrained, alpha=0.5, **kwargs)


@register_model
def mobilenet_v1_075(pretrained: bool = False, **kwargs) -> MobileNetV1:
    return _create_mobilenet_v1("mobilenet_v1_075", pretrained, alpha=0.75, **kwargs)


@register_model
def mobilenet_v1_100(pretrained: bool = False, **kwargs) -> MobileNetV1:
    return _create_mobilenet_v1("mobilenet_v1_100", pretrained, alpha=1.0, **kwargs)
