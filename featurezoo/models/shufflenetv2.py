"""ShuffleNetV2, with MindCV's module tree and parameter names.

`ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design
<https://arxiv.org/abs/1807.11164>`_. A stride-1 block splits the channels in
two (MindCV's shuffle-and-split: even channels pass through, odd ones go to
``branch_main``); a stride-2 block runs ``branch_proj`` and ``branch_main`` on
the whole input. The stem's max pool uses MindSpore's ``same`` padding, the
convs pad symmetrically.

MindCV has no ``feature_info`` here; ours is the last layer at each reduction:
``first_conv``, ``max_pool``, the last block of the first two stages and, at
stride 32, ``conv_last`` (the 1x1 conv to 1024/2048 channels that follows the
last stage; MindCV runs it in ``forward_head``). The last stage's output is
that conv's input.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.feature_levels import note_feature
from ..layers.init import init_weights, inv_in_normal, normal
from ..registry import register_model
from .shufflenetv1 import add_stem

__all__ = ["ShuffleNetV2", "ShuffleV2Block"]

_STAGE_REPEATS = (4, 8, 4)
# model size -> stem channels, the three stages' output channels, conv_last channels
_STAGE_OUT_CHANNELS = {
    "0.5x": (24, 48, 96, 192, 1024),
    "1.0x": (24, 116, 232, 464, 1024),
    "1.5x": (24, 176, 352, 704, 1024),
    "2.0x": (24, 244, 488, 976, 2048),
}


class ShuffleV2Block(nn.Module):
    """Stride 1: half the channels pass, the other half go through 1x1 / 3x3 depthwise / 1x1; stride 2:
    a depthwise/1x1 projection and the main branch both see the input. Outputs are concatenated."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, kernel_size: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV2Block stride must be 1 or 2, got {stride}")
        self.stride = stride
        pad = kernel_size // 2
        out_channels = out_channels - in_channels  # the passed-through or projected half fills the rest
        self.branch_main = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size, stride, padding=pad, groups=mid_channels, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.branch_proj = None
        if stride == 2:
            self.branch_proj = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding=pad, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, in_channels, 1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x_proj, x = self.channel_shuffle(x)
            return torch.cat((x_proj, self.branch_main(x)), dim=1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), dim=1)

    @staticmethod
    def channel_shuffle(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # MindCV's layout: channel pairs (2i, 2i + 1) split into the two halves.
        b, c, h, w = x.shape
        x = x.reshape(b * c // 2, 2, h * w).transpose(0, 1).reshape(2, -1, c // 2, h, w)
        return x[0], x[1]


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 classifier; ``feature_info``: ``first_conv``, ``max_pool``, the last block of the
    first two stages, ``conv_last``.

    Args:
        num_classes, in_channels: classifier outputs, input channels.
        model_size: ``"0.5x"``, ``"1.0x"``, ``"1.5x"`` or ``"2.0x"``.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, model_size: str = "1.5x"):
        super().__init__()
        if model_size not in _STAGE_OUT_CHANNELS:
            raise ValueError(f"ShuffleNetV2: no setting for model_size={model_size!r}; valid: "
                             f"{sorted(_STAGE_OUT_CHANNELS)}")
        self.stage_repeats = list(_STAGE_REPEATS)
        self.model_size = model_size
        # MindCV's list starts with a -1 placeholder.
        self.stage_out_channels = [-1, *_STAGE_OUT_CHANNELS[model_size]]

        input_channel = self.stage_out_channels[1]
        reduction = add_stem(self, in_channels, input_channel)

        features: List[nn.Module] = []
        for idxstage, numrepeat in enumerate(self.stage_repeats):
            output_channel = self.stage_out_channels[idxstage + 2]
            for i in range(numrepeat):
                if i == 0:
                    block = ShuffleV2Block(input_channel, output_channel, output_channel // 2, kernel_size=3, stride=2)
                else:
                    block = ShuffleV2Block(input_channel // 2, output_channel, output_channel // 2, kernel_size=3,
                                           stride=1)
                features.append(block)
                input_channel = output_channel
                reduction *= block.stride
                note_feature(self.feature_info, output_channel, reduction, f"features.{len(features) - 1}")
        self.features = nn.Sequential(*features)

        last_channels = self.stage_out_channels[-1]
        self.conv_last = nn.Sequential(
            nn.Conv2d(input_channel, last_channels, 1, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU(),
        )
        note_feature(self.feature_info, last_channels, reduction, "conv_last")
        self.num_features = last_channels
        self.pool = GlobalAvgPooling()
        self.classifier = nn.Linear(last_channels, num_classes, bias=False)
        init_weights(self, conv=inv_in_normal, linear=normal(0.01), special={self.first_conv[0]: normal(0.01)})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.max_pool(self.first_conv(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.conv_last(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_shufflenet_v2(variant: str, pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return build_model_with_cfg(ShuffleNetV2, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="first_conv.0", classifier="classifier", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/shufflenet/shufflenetv2"
default_cfgs = generate_default_cfgs({
    "shufflenet_v2_x0_5": _cfg(f"{_MS}/shufflenet_v2_x0_5-8c841061.ckpt"),
    "shufflenet_v2_x1_0": _cfg(f"{_MS}/shufflenet_v2_x1_0-0da4b7fa.ckpt"),
    "shufflenet_v2_x1_5": _cfg(f"{_MS}/shufflenet_v2_x1_5-00b56131.ckpt"),
    "shufflenet_v2_x2_0": _cfg(f"{_MS}/shufflenet_v2_x2_0-ed8e698d.ckpt"),
})


@register_model
def shufflenet_v2_x0_5(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _create_shufflenet_v2("shufflenet_v2_x0_5", pretrained, model_size="0.5x", **kwargs)


@register_model
def shufflenet_v2_x1_0(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _create_shufflenet_v2("shufflenet_v2_x1_0", pretrained, model_size="1.0x", **kwargs)


@register_model
def shufflenet_v2_x1_5(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _create_shufflenet_v2("shufflenet_v2_x1_5", pretrained, model_size="1.5x", **kwargs)


@register_model
def shufflenet_v2_x2_0(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _create_shufflenet_v2("shufflenet_v2_x2_0", pretrained, model_size="2.0x", **kwargs)
