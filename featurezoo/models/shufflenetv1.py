"""ShuffleNetV1, with MindCV's module tree and parameter names.

`ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices
<https://arxiv.org/abs/1707.01083>`_. Each block is a grouped 1x1 conv, a
channel shuffle, a 3x3 depthwise conv and a grouped 1x1 conv; a stride-2 block
concatenates a 3x3 average pool of its input. The stem's max pool and those
average pools use MindSpore's ``same`` padding (extra row/column at the
bottom/right), the convs pad symmetrically.

MindCV has no ``feature_info`` here; ours is the last layer at each reduction:
``first_conv``, ``max_pool``, then the last block of each of the three stages.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import AvgPool2d, GlobalAvgPooling, MaxPool2d
from ..layers.feature_levels import note_feature
from ..layers.helpers import total_stride
from ..layers.init import init_weights, inv_in_normal, normal
from ..registry import register_model

__all__ = ["ShuffleNetV1", "ShuffleV1Block"]

_STAGE_REPEATS = (4, 8, 4)
# (groups, model size) -> stem channels, then the three stages' output channels
_STAGE_OUT_CHANNELS = {
    (3, "0.5x"): (12, 120, 240, 480),
    (3, "1.0x"): (24, 240, 480, 960),
    (3, "1.5x"): (24, 360, 720, 1440),
    (3, "2.0x"): (48, 480, 960, 1920),
    (8, "0.5x"): (16, 192, 384, 768),
    (8, "1.0x"): (24, 384, 768, 1536),
    (8, "1.5x"): (24, 576, 1152, 2304),
    (8, "2.0x"): (48, 768, 1536, 3072),
}


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 conv -> channel shuffle -> 3x3 depthwise conv -> grouped 1x1 conv, plus the input
    (stride 1) or, concatenated, its 3x3 average pool (stride 2); then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int, group: int,
                 first_group: bool):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV1Block stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.group = group
        if stride == 2:
            out_channels = out_channels - in_channels  # the pooled input fills the rest
        # The first block's input (the stem) is too narrow to group.
        self.branch_main_1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, groups=1 if first_group else group, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(),
        )
        self.branch_main_2 = nn.Sequential(
            nn.Conv2d(mid_channels, mid_channels, 3, stride, padding=1, groups=mid_channels, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.Conv2d(mid_channels, out_channels, 1, groups=group, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride == 2:
            self.branch_proj = AvgPool2d(kernel_size=3, stride=2, pad_mode="same")
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch_main_1(x)
        if self.group > 1:
            out = self.channel_shuffle(out)
        out = self.branch_main_2(out)
        if self.stride == 1:
            return self.relu(x + out)
        return self.relu(torch.cat((self.branch_proj(x), out), dim=1))

    def channel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        # MindCV's order: channels viewed as (C // group, group), then transposed.
        b, c, h, w = x.shape
        return x.reshape(b, c // self.group, self.group, h, w).transpose(1, 2).reshape(b, c, h, w)


def add_stem(model: nn.Module, in_channels: int, channels: int) -> int:
    """Give ``model`` the ShuffleNet stem (V1's and V2's): ``first_conv`` (3x3 stride-2 conv, BN, ReLU)
    and ``max_pool`` (3x3 stride 2, MindSpore's ``same``), both in a new ``model.feature_info``.
    Returns the stem's reduction."""
    model.first_conv = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, 2, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )
    model.max_pool = MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
    model.feature_info = []
    reduction = total_stride(model.first_conv)
    note_feature(model.feature_info, channels, reduction, "first_conv")
    reduction *= total_stride(model.max_pool)
    note_feature(model.feature_info, channels, reduction, "max_pool")
    return reduction


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 classifier; ``feature_info``: ``first_conv``, ``max_pool``, the last block of each stage.

    Args:
        num_classes, in_channels: classifier outputs, input channels.
        model_size: ``"0.5x"``, ``"1.0x"``, ``"1.5x"`` or ``"2.0x"``.
        group: groups of the 1x1 convs (3 or 8).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, model_size: str = "2.0x", group: int = 3):
        super().__init__()
        if (group, model_size) not in _STAGE_OUT_CHANNELS:
            raise ValueError(f"ShuffleNetV1: no setting for group={group}, model_size={model_size!r}; valid: "
                             f"{sorted(_STAGE_OUT_CHANNELS)}")
        self.stage_repeats = list(_STAGE_REPEATS)
        self.model_size = model_size
        # MindCV's list starts with a -1 placeholder.
        self.stage_out_channels = [-1, *_STAGE_OUT_CHANNELS[(group, model_size)]]

        input_channel = self.stage_out_channels[1]
        reduction = add_stem(self, in_channels, input_channel)

        features: List[nn.Module] = []
        for idxstage, numrepeat in enumerate(self.stage_repeats):
            output_channel = self.stage_out_channels[idxstage + 2]
            for i in range(numrepeat):
                stride = 2 if i == 0 else 1
                features.append(ShuffleV1Block(input_channel, output_channel, mid_channels=output_channel // 4,
                                               stride=stride, group=group, first_group=idxstage == 0 and i == 0))
                input_channel = output_channel
                reduction *= stride
                note_feature(self.feature_info, output_channel, reduction, f"features.{len(features) - 1}")
        self.features = nn.Sequential(*features)

        self.num_features = input_channel
        self.global_pool = GlobalAvgPooling()
        self.classifier = nn.Linear(input_channel, num_classes, bias=False)
        init_weights(self, conv=inv_in_normal, linear=normal(0.01), special={self.first_conv[0]: normal(0.01)})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.max_pool(self.first_conv(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.global_pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_shufflenet_v1(variant: str, pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return build_model_with_cfg(ShuffleNetV1, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="first_conv.0", classifier="classifier", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/shufflenet/shufflenetv1"
default_cfgs = generate_default_cfgs({
    "shufflenet_v1_g3_05": _cfg(f"{_MS}/shufflenet_v1_g3_05-42cfe109.ckpt"),
    "shufflenet_v1_g3_10": _cfg(f"{_MS}/shufflenet_v1_g3_10-245f0ccf.ckpt"),
    "shufflenet_v1_g3_15": _cfg(),
    "shufflenet_v1_g3_20": _cfg(),
    "shufflenet_v1_g8_05": _cfg(),
    "shufflenet_v1_g8_10": _cfg(),
    "shufflenet_v1_g8_15": _cfg(),
    "shufflenet_v1_g8_20": _cfg(),
})


@register_model
def shufflenet_v1_g3_05(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g3_05", pretrained, group=3, model_size="0.5x", **kwargs)


@register_model
def shufflenet_v1_g3_10(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g3_10", pretrained, group=3, model_size="1.0x", **kwargs)


@register_model
def shufflenet_v1_g3_15(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g3_15", pretrained, group=3, model_size="1.5x", **kwargs)


@register_model
def shufflenet_v1_g3_20(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g3_20", pretrained, group=3, model_size="2.0x", **kwargs)


@register_model
def shufflenet_v1_g8_05(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g8_05", pretrained, group=8, model_size="0.5x", **kwargs)


@register_model
def shufflenet_v1_g8_10(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g8_10", pretrained, group=8, model_size="1.0x", **kwargs)


@register_model
def shufflenet_v1_g8_15(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g8_15", pretrained, group=8, model_size="1.5x", **kwargs)


@register_model
def shufflenet_v1_g8_20(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    return _create_shufflenet_v1("shufflenet_v1_g8_20", pretrained, group=8, model_size="2.0x", **kwargs)
