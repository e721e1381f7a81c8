"""MixNet, with MindCV's module tree and parameter names.

`MixConv: Mixed Depthwise Convolutional Kernels <https://arxiv.org/abs/1907.09595>`_.
A mixed depthwise conv splits its channels into groups, one kernel size per
group (the first group takes the remainder channels); grouped 1x1 convs split
the same way. The model is ``stem_conv``, one ``MixNetBlock`` per row of the
setting in ``layers``, and ``head_conv`` (1x1 to 1536/bn/ReLU, the end of
MindCV's ``forward_features``). All convs pad symmetrically.

MindCV has no ``feature_info`` here; ours is the last layer at each reduction:
``layers.0``, the last block before each stride-2 block, and ``head_conv``.
``output_stride=16`` (or 8) turns the strides that would pass it into dilation
(timm's EfficientNet-builder rule, which timm's MixNet uses: the block that
loses its stride keeps the dilation before it, the blocks after take the new
one); the entries stay those of the model at stride 32, with the real reductions.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.activation import Swish
from ..layers.feature_levels import note_feature
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import fan_out_normal, init_weights, inv_sqrt_out_uniform
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["MixNet", "MixNetBlock", "MDConv", "GroupedConv2d"]

# in, out, depthwise kernels, expand kernels, project kernels, stride, expansion, activation, SE ratio
_SMALL = (
    (16, 16, (3,), (1,), (1,), 1, 1, "ReLU", 0.0),
    (16, 24, (3,), (1, 1), (1, 1), 2, 6, "ReLU", 0.0),
    (24, 24, (3,), (1, 1), (1, 1), 1, 3, "ReLU", 0.0),
    (24, 40, (3, 5, 7), (1,), (1,), 2, 6, "Swish", 0.5),
    (40, 40, (3, 5), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (40, 40, (3, 5), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (40, 40, (3, 5), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (40, 80, (3, 5, 7), (1,), (1, 1), 2, 6, "Swish", 0.25),
    (80, 80, (3, 5), (1,), (1, 1), 1, 6, "Swish", 0.25),
    (80, 80, (3, 5), (1,), (1, 1), 1, 6, "Swish", 0.25),
    (80, 120, (3, 5, 7), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (120, 120, (3, 5, 7, 9), (1, 1), (1, 1), 1, 3, "Swish", 0.5),
    (120, 120, (3, 5, 7, 9), (1, 1), (1, 1), 1, 3, "Swish", 0.5),
    (120, 200, (3, 5, 7, 9, 11), (1,), (1,), 2, 6, "Swish", 0.5),
    (200, 200, (3, 5, 7, 9), (1,), (1, 1), 1, 6, "Swish", 0.5),
    (200, 200, (3, 5, 7, 9), (1,), (1, 1), 1, 6, "Swish", 0.5),
)
# medium and large (large = medium widened 1.3x)
_MEDIUM = (
    (24, 24, (3,), (1,), (1,), 1, 1, "ReLU", 0.0),
    (24, 32, (3, 5, 7), (1, 1), (1, 1), 2, 6, "ReLU", 0.0),
    (32, 32, (3,), (1, 1), (1, 1), 1, 3, "ReLU", 0.0),
    (32, 40, (3, 5, 7, 9), (1,), (1,), 2, 6, "Swish", 0.5),
    (40, 40, (3, 5), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (40, 40, (3, 5), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (40, 40, (3, 5), (1, 1), (1, 1), 1, 6, "Swish", 0.5),
    (40, 80, (3, 5, 7), (1,), (1,), 2, 6, "Swish", 0.25),
    (80, 80, (3, 5, 7, 9), (1, 1), (1, 1), 1, 6, "Swish", 0.25),
    (80, 80, (3, 5, 7, 9), (1, 1), (1, 1), 1, 6, "Swish", 0.25),
    (80, 80, (3, 5, 7, 9), (1, 1), (1, 1), 1, 6, "Swish", 0.25),
    (80, 120, (3,), (1,), (1,), 1, 6, "Swish", 0.5),
    (120, 120, (3, 5, 7, 9), (1, 1), (1, 1), 1, 3, "Swish", 0.5),
    (120, 120, (3, 5, 7, 9), (1, 1), (1, 1), 1, 3, "Swish", 0.5),
    (120, 120, (3, 5, 7, 9), (1, 1), (1, 1), 1, 3, "Swish", 0.5),
    (120, 200, (3, 5, 7, 9), (1,), (1,), 2, 6, "Swish", 0.5),
    (200, 200, (3, 5, 7, 9), (1,), (1, 1), 1, 6, "Swish", 0.5),
    (200, 200, (3, 5, 7, 9), (1,), (1, 1), 1, 6, "Swish", 0.5),
    (200, 200, (3, 5, 7, 9), (1,), (1, 1), 1, 6, "Swish", 0.5),
)
# setting, stem channels, width multiplier
_ARCHS = {"small": (_SMALL, 16, 1.0), "medium": (_MEDIUM, 24, 1.0), "large": (_MEDIUM, 24, 1.3)}


def _split_channels(channels: int, num_groups: int) -> List[int]:
    split = [channels // num_groups] * num_groups
    split[0] += channels - sum(split)
    return split


def _split_forward(convs: nn.ModuleList, split: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    parts = torch.split(x, list(split), dim=1)  # indexed, not iterated: torch.fx traces it
    return torch.cat([conv(parts[i]) for i, conv in enumerate(convs)], dim=1)


class GroupedConv2d(nn.Module):
    """A conv, or one conv per channel group (``grouped_conv``, a ModuleList) whose outputs are concatenated."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: int = 1,
                 padding: int = 0):
        super().__init__()
        self.num_groups = len(kernel_size)
        if self.num_groups == 1:
            self.grouped_conv = nn.Conv2d(in_channels, out_channels, kernel_size[0], stride, padding, bias=False)
        else:
            self.split_in_channels = _split_channels(in_channels, self.num_groups)
            self.split_out_channels = _split_channels(out_channels, self.num_groups)
            self.grouped_conv = nn.ModuleList(
                nn.Conv2d(cin, cout, k, stride, padding, bias=False)
                for cin, cout, k in zip(self.split_in_channels, self.split_out_channels, kernel_size)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            return self.grouped_conv(x)
        return _split_forward(self.grouped_conv, self.split_in_channels, x)


class MDConv(nn.Module):
    """Mixed depthwise conv: one kernel size per channel group, each padded by ``dilation * (k // 2)``."""

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: int, dilation: int = 1):
        super().__init__()
        self.num_groups = len(kernel_size)
        if self.num_groups == 1:
            k = kernel_size[0]
            self.mixed_depthwise_conv = nn.Conv2d(channels, channels, k, stride, dilation * (k // 2), dilation,
                                                  groups=channels, bias=False)
        else:
            self.split_channels = _split_channels(channels, self.num_groups)
            self.mixed_depthwise_conv = nn.ModuleList(
                nn.Conv2d(c, c, k, stride, dilation * (k // 2), dilation, groups=c, bias=False)
                for c, k in zip(self.split_channels, kernel_size)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            return self.mixed_depthwise_conv(x)
        return _split_forward(self.mixed_depthwise_conv, self.split_channels, x)


class MixNetBlock(nn.Module):
    """(Grouped 1x1 expand), mixed depthwise conv, (SE), grouped 1x1 project, in one ``convs`` sequence;
    residual when the block keeps both stride and channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int] = (3,),
                 expand_ksize: Sequence[int] = (1,), project_ksize: Sequence[int] = (1,), stride: int = 1,
                 expand_ratio: int = 1, activation: str = "ReLU", se_ratio: float = 0.0, dilation: int = 1):
        super().__init__()
        if activation not in ("ReLU", "Swish"):
            raise ValueError(f"MixNetBlock activation must be 'ReLU' or 'Swish', got {activation!r}")
        self.activation = Swish if activation == "Swish" else nn.ReLU
        expand_channels = in_channels * expand_ratio
        self.residual_connection = stride == 1 and in_channels == out_channels

        conv: List[nn.Module] = []
        if expand_ratio != 1:
            conv += [GroupedConv2d(in_channels, expand_channels, expand_ksize), nn.BatchNorm2d(expand_channels),
                     self.activation()]
        conv += [MDConv(expand_channels, kernel_size, stride, dilation), nn.BatchNorm2d(expand_channels),
                 self.activation()]
        if se_ratio > 0:
            # The squeeze width follows the block's input channels, not the expanded ones.
            conv.append(SqueezeExcite(expand_channels, rd_channels=int(in_channels * se_ratio)))
        conv += [GroupedConv2d(expand_channels, out_channels, project_ksize), nn.BatchNorm2d(out_channels)]
        self.convs = nn.Sequential(*conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual_connection:
            return x + self.convs(x)
        return self.convs(x)


class MixNet(nn.Module):
    """MixNet classifier; ``feature_info``: the last layer at each reduction (``layers.*``, ``head_conv``).

    Args:
        arch: ``"small"``, ``"medium"`` or ``"large"``.
        num_classes, in_channels: classifier outputs, input channels.
        feature_size: channels of ``head_conv``.
        drop_rate: dropout before the classifier.
        depth_multiplier: extra width multiplier (channels rounded to multiples of 8).
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, arch: str = "small", num_classes: int = 1000, in_channels: int = 3, feature_size: int = 1536,
                 drop_rate: float = 0.2, depth_multiplier: float = 1.0, output_stride: int = 32):
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"Unsupported MixNet arch {arch!r}; valid: {sorted(_ARCHS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MixNet: output_stride must be 8, 16 or 32, got {output_stride!r}")
        setting, stem_channels, multiplier = _ARCHS[arch]
        depth_multiplier *= multiplier
        if depth_multiplier != 1.0:
            stem_channels = make_divisible(stem_channels * depth_multiplier, 8)
            setting = tuple((make_divisible(cin * depth_multiplier, 8), make_divisible(cout * depth_multiplier, 8))
                            + tuple(rest) for cin, cout, *rest in setting)

        self.stem_conv = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(),
        )
        # ``nominal``: the reduction at output_stride 32, which chooses the entries and numbers their stages.
        nominal = reduction = total_stride(self.stem_conv)
        dilation = 1
        self.feature_info: List[Dict] = []
        note_feature(self.feature_info, stem_channels, nominal, "stem_conv")
        layers: List[nn.Module] = []
        for inc, outc, k, ek, pk, s, er, ac, se in setting:
            stride, block_dilation = s, dilation
            if reduction * s > output_stride:
                stride, dilation = 1, dilation * s
            layers.append(MixNetBlock(inc, outc, kernel_size=k, expand_ksize=ek, project_ksize=pk, stride=stride,
                                      expand_ratio=er, activation=ac, se_ratio=se, dilation=block_dilation))
            reduction, nominal = reduction * stride, nominal * s
            note_feature(self.feature_info, outc, nominal, f"layers.{len(layers) - 1}")
        self.layers = nn.Sequential(*layers)
        self.head_conv = nn.Sequential(
            nn.Conv2d(setting[-1][1], feature_size, 1, bias=False),
            nn.BatchNorm2d(feature_size),
            nn.ReLU(),
        )
        note_feature(self.feature_info, feature_size, nominal, "head_conv")
        for entry in self.feature_info:  # the stage of each entry past the stem, then its real reduction
            if entry["reduction"] >= 4:
                entry["stage"] = entry["reduction"].bit_length() - 2
            entry["reduction"] = min(entry["reduction"], output_stride)

        self.num_features = feature_size
        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=drop_rate)
        self.classifier = nn.Linear(feature_size, num_classes)
        init_weights(self, conv=fan_out_normal, linear=inv_sqrt_out_uniform)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_conv(self.layers(self.stem_conv(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mixnet(variant: str, pretrained: bool = False, **kwargs) -> MixNet:
    return build_model_with_cfg(MixNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="stem_conv.0", classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/mixnet"
default_cfgs = generate_default_cfgs({
    "mixnet_s": _cfg(f"{_MS}/mixnet_s-2a5ef3a3.ckpt"),
    "mixnet_m": _cfg(f"{_MS}/mixnet_m-74cc4cb1.ckpt"),
    "mixnet_l": _cfg(f"{_MS}/mixnet_l-978edf2b.ckpt"),
})


# No timm twin: timm's mixnet_* have the same tensors, but MindCV's squeeze-excite uses ReLU where timm's
# uses Swish, so timm's weights would compute another function (logits 3-6% apart when randomised).


@register_model
def mixnet_s(pretrained: bool = False, **kwargs) -> MixNet:
    return _create_mixnet("mixnet_s", pretrained, arch="small", **kwargs)


@register_model
def mixnet_m(pretrained: bool = False, **kwargs) -> MixNet:
    return _create_mixnet("mixnet_m", pretrained, arch="medium", **kwargs)


@register_model
def mixnet_l(pretrained: bool = False, **kwargs) -> MixNet:
    return _create_mixnet("mixnet_l", pretrained, arch="large", **kwargs)
