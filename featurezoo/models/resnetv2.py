"""ResNetV2 (pre-activation ResNet), with MindCV's module tree and parameter names.

`Identity Mappings in Deep Residual Networks <https://arxiv.org/abs/1603.05027>`_.
As in MindCV, the network is its ResNet (post-activation stem, ``same``-padded
max pool, conv + BN shortcuts) with pre-activation bottlenecks and no final
norm before the pooled head; ``feature_info`` is therefore ResNet's: the stem's
``relu`` and ``layer1``..``layer4``, and ``output_stride`` dilates it as ResNet.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..registry import register_model
from .resnet import ResNet

__all__ = ["PreActBottleneck"]


class PreActBottleneck(nn.Module):
    """``x + conv3(act(bn3(conv2(act(bn2(conv1(act(bn1(x)))))))))``; the shortcut projects the
    pre-activated input."""

    expansion: int = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm: Optional[Type[nn.Module]] = None, down_sample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        first_dilation = first_dilation or dilation
        norm = norm or nn.BatchNorm2d
        width = int(channels * (base_width / 64.0)) * groups
        self.bn1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=first_dilation, dilation=first_dilation,
                               groups=groups, bias=False)
        self.bn3 = norm(width)
        self.conv3 = nn.Conv2d(width, channels * self.expansion, 1, bias=False)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.down_sample is None else self.down_sample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + identity


def _create_resnetv2(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, pretrained, default_cfg=default_cfgs[variant], block=PreActBottleneck,
                                **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv1", classifier="classifier", output_strides=(8, 16, 32),
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "resnetv2_50": _cfg(f"{_MS}/resnetv2/resnetv2_50-3c2f143b.ckpt"),
    "resnetv2_101": _cfg(f"{_MS}/resnetv2/resnetv2_101-5d4c49a1.ckpt"),
})


# No timm twin: timm's resnetv2_50/101 are not this network. MindCV's ResNetV2 keeps its ResNet's stem BN and
# conv + BN shortcuts (five BNs that timm's norm-free stem and plain-conv shortcuts lack) and has no final norm
# (timm's ``norm``), and its classifier is nn.Linear where timm's head is a 1x1 conv.


@register_model
def resnetv2_50(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnetv2("resnetv2_50", pretrained, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnetv2_101(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnetv2("resnetv2_101", pretrained, layers=(3, 4, 23, 3), **kwargs)
