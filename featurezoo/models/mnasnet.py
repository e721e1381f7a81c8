"""MnasNet (B1), with MindCV's module tree and parameter names.

`MnasNet: Platform-Aware Neural Architecture Search for Mobile <https://arxiv.org/abs/1807.11626>`_.
Stem (conv/bn/ReLU, depthwise conv/bn/ReLU, linear 1x1 conv/bn), one
``InvertedResidual`` per block and the head's 1x1 conv to 1280/bn/ReLU form one
``features`` sequence; convs pad symmetrically (MindCV's ``pad_mode="pad"``).
BatchNorm uses eps 1e-3 and MindSpore momentum 0.99 (PyTorch 0.01) throughout.
MindCV has no ``feature_info`` here; ours is the last layer at each reduction,
which at stride 32 is the head's 1280-channel ReLU (``features`` ends there).
``output_stride=16`` (or 8) turns the strides that would pass it into dilation
(timm's EfficientNet-builder rule, which timm's MnasNet uses: the block that
loses its stride keeps the dilation before it, the blocks after take the new
one); the entries stay those of the model at stride 32, with the real reductions.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.feature_levels import note_feature
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import fan_out_normal, init_weights, lecun_uniform_fan_out
from ..registry import register_model

__all__ = ["Mnasnet", "InvertedResidual"]

# expansion t, output channels c, blocks n, stride of the first block s, kernel size k
_SETTING = (
    (3, 24, 3, 2, 3),
    (3, 40, 3, 2, 5),
    (6, 80, 3, 2, 5),
    (6, 96, 2, 1, 3),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
_HEAD_CHANNELS = 1280


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class InvertedResidual(nn.Module):
    """1x1 expand, kxk depthwise, linear 1x1 project; residual when the block
    keeps both stride and channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int, expand_ratio: int,
                 dilation: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden_dim = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1, bias=False),
            _bn(hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, padding=dilation * (kernel_size // 2),
                      dilation=dilation, groups=hidden_dim, bias=False),
            _bn(hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, out_channels, 1, bias=False),
            _bn(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return self.layers(x) + x
        return self.layers(x)


class Mnasnet(nn.Module):
    """MnasNet classifier; ``feature_info``: the last layer at each reduction (``features.*``).

    Args:
        alpha: width multiplier (channels rounded to multiples of 8; the head stays 1280).
        in_channels, num_classes: input channels, classifier outputs.
        drop_rate: dropout before the classifier.
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, alpha: float, in_channels: int = 3, num_classes: int = 1000, drop_rate: float = 0.2,
                 output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"Mnasnet: output_stride must be 8, 16 or 32, got {output_stride!r}")
        mid_channels = make_divisible(32 * alpha, 8)
        input_channels = make_divisible(16 * alpha, 8)
        features: List[nn.Module] = [
            nn.Conv2d(in_channels, mid_channels, 3, 2, padding=1, bias=False),
            _bn(mid_channels),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 3, 1, padding=1, groups=mid_channels, bias=False),
            _bn(mid_channels),
            nn.ReLU(),
            nn.Conv2d(mid_channels, input_channels, 1, bias=False),
            _bn(input_channels),
        ]
        # ``nominal``: the reduction at output_stride 32, which chooses the entries and numbers their stages.
        nominal = reduction = total_stride(*features)
        dilation = 1
        self.feature_info: List[Dict] = []
        note_feature(self.feature_info, input_channels, nominal, f"features.{len(features) - 1}")
        for t, c, n, s, k in _SETTING:
            output_channels = make_divisible(c * alpha, 8)
            for i in range(n):
                stride = s if i == 0 else 1
                nominal *= stride
                block_stride, block_dilation = stride, dilation
                if reduction * stride > output_stride:
                    block_stride, dilation = 1, dilation * stride
                features.append(InvertedResidual(input_channels, output_channels, block_stride, k, t, block_dilation))
                input_channels = output_channels
                reduction *= block_stride
                note_feature(self.feature_info, output_channels, nominal, f"features.{len(features) - 1}")
        features += [nn.Conv2d(input_channels, _HEAD_CHANNELS, 1, bias=False), _bn(_HEAD_CHANNELS), nn.ReLU()]
        note_feature(self.feature_info, _HEAD_CHANNELS, nominal, f"features.{len(features) - 1}")
        for entry in self.feature_info:  # the stage of each entry past the stem, then its real reduction
            if entry["reduction"] >= 4:
                entry["stage"] = entry["reduction"].bit_length() - 2
            entry["reduction"] = min(entry["reduction"], output_stride)
        self.features = nn.Sequential(*features)

        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=drop_rate)
        self.num_features = _HEAD_CHANNELS
        self.classifier = nn.Linear(_HEAD_CHANNELS, num_classes)
        init_weights(self, conv=fan_out_normal, linear=lecun_uniform_fan_out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mnasnet(variant: str, pretrained: bool = False, **kwargs) -> Mnasnet:
    return build_model_with_cfg(Mnasnet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.0", classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/mnasnet"
default_cfgs = generate_default_cfgs({
    "mnasnet_050": _cfg(f"{_MS}/mnasnet_050-7d8bf4db.ckpt"),
    "mnasnet_075": _cfg(f"{_MS}/mnasnet_075-465d366d.ckpt"),
    "mnasnet_100": _cfg(f"{_MS}/mnasnet_100-1bcf43f8.ckpt"),
    "mnasnet_130": _cfg(f"{_MS}/mnasnet_130-a43a150a.ckpt"),
    "mnasnet_140": _cfg(f"{_MS}/mnasnet_140-7e20bb30.ckpt"),
})


# No timm twin: timm's mnasnet_* have the same tensors, but BatchNorm eps 1e-5 where MindCV has 1e-3
# (TF's), so timm's weights would compute another function (logits ~2% apart when randomised).


@register_model
def mnasnet_050(pretrained: bool = False, **kwargs) -> Mnasnet:
    return _create_mnasnet("mnasnet_050", pretrained, alpha=0.5, **kwargs)


@register_model
def mnasnet_075(pretrained: bool = False, **kwargs) -> Mnasnet:
    return _create_mnasnet("mnasnet_075", pretrained, alpha=0.75, **kwargs)


@register_model
def mnasnet_100(pretrained: bool = False, **kwargs) -> Mnasnet:
    return _create_mnasnet("mnasnet_100", pretrained, alpha=1.0, **kwargs)


@register_model
def mnasnet_130(pretrained: bool = False, **kwargs) -> Mnasnet:
    return _create_mnasnet("mnasnet_130", pretrained, alpha=1.3, **kwargs)


@register_model
def mnasnet_140(pretrained: bool = False, **kwargs) -> Mnasnet:
    return _create_mnasnet("mnasnet_140", pretrained, alpha=1.4, **kwargs)
