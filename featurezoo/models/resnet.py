"""ResNet and ResNeXt, with MindCV's module tree and parameter names.

`Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`_;
the stride sits in the 3x3 conv of a bottleneck (ResNet v1.5), the stem's max
pool uses MindSpore's ``same`` padding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling, MaxPool2d
from ..layers.helpers import total_stride
from ..layers.init import fan_out_normal, init_weights, lecun_uniform
from ..registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "stage_dilations"]


def stage_dilations(output_stride: int, stem_stride: int, num_stages: int = 4) -> List[Tuple[int, int, int]]:
    """Each stage's ``(stride, first_dilation, dilation)`` for ``output_stride`` (timm's ``make_blocks``
    schedule): stage 1 keeps the stem's resolution, each later one halves it until the accumulated
    stride reaches ``output_stride``; from there a stage keeps stride 1 and multiplies the dilation by
    the stride it gave up. A stage's first block still sees the previous stage's resolution, so it keeps
    the previous dilation (``first_dilation``), as torchvision's ``replace_stride_with_dilation``.

    >>> stage_dilations(16, 4)
    [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]
    >>> stage_dilations(8, 4)
    [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
    """
    if isinstance(output_stride, bool) or output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    plan, net_stride, dilation = [], stem_stride, 1
    for i in range(num_stages):
        stride, first_dilation = (1 if i == 0 else 2), dilation
        if net_stride >= output_stride:
            stride, dilation = 1, dilation * stride
        else:
            net_stride *= stride
        plan.append((stride, first_dilation, dilation))
    return plan


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
          dilation: int = 1) -> nn.Conv2d:
    # MindCV pads k>1 convs by k//2 and gives none a bias; for its 1x1 "same" convs padding is 0 at any stride.
    # Dilated, the padding grows with the kernel's reach: sizes stay ceil(size / stride).
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=dilation * (kernel_size - 1) // 2,
                     dilation=dilation, groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm: Optional[Type[nn.Module]] = None, down_sample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock supports only groups=1 and base_width=64, got {groups}, {base_width}")
        norm = norm or nn.BatchNorm2d
        self.conv1 = _conv(in_channels, channels, 3, stride, dilation=first_dilation or dilation)
        self.bn1 = norm(channels)
        self.relu = nn.ReLU(inplace=True)  # only ever applied to a fresh BN output or sum
        self.conv2 = _conv(channels, channels, 3, dilation=dilation)
        self.bn2 = norm(channels)
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # The shortcut after the branch, added in place: one map fewer alive at the peak.
        out += x if self.down_sample is None else self.down_sample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm: Optional[Type[nn.Module]] = None, down_sample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        norm = norm or nn.BatchNorm2d
        width = int(channels * (base_width / 64.0)) * groups
        self.conv1 = _conv(in_channels, width, 1)
        self.bn1 = norm(width)
        self.conv2 = _conv(width, width, 3, stride, groups, dilation=first_dilation or dilation)
        self.bn2 = norm(width)
        self.conv3 = _conv(width, channels * self.expansion, 1)
        self.bn3 = norm(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # only ever applied to a fresh BN output or sum
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.down_sample is None else self.down_sample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet/ResNeXt classifier; ``feature_info``: the stem's ``relu`` and ``layer1``..``layer4``.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        num_classes, in_channels: classifier outputs, input channels.
        groups, base_width: ResNeXt cardinality and width per group.
        norm: normalisation layer class (``nn.BatchNorm2d``).
        output_stride: 16 or 8 dilates the last stage(s) instead of striding them
            (:func:`stage_dilations`); the parameters are the stride-32 model's.
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, groups: int = 1, base_width: int = 64,
                 norm: Optional[Type[nn.Module]] = None, output_stride: int = 32):
        super().__init__()
        self.norm = norm or nn.BatchNorm2d
        self.input_channels = 64
        self.groups = groups
        self.base_with = base_width  # MindCV's spelling, kept for attribute compatibility

        self.conv1 = _conv(in_channels, self.input_channels, 7, stride=2)
        self.bn1 = self.norm(self.input_channels)
        self.relu = nn.ReLU(inplace=True)  # only ever applied to a fresh BN output or sum
        reduction = total_stride(self.conv1)
        self.feature_info = [dict(chs=self.input_channels, reduction=reduction, name="relu")]
        self.max_pool = MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        reduction *= total_stride(self.max_pool)
        plan = stage_dilations(output_stride, reduction, len(layers))
        for i, (channels, num_blocks, (stride, first_dilation, dilation)) in enumerate(
                zip((64, 128, 256, 512), layers, plan)):
            reduction *= stride
            self.add_module(f"layer{i + 1}", self._make_layer(block, channels, num_blocks, stride, dilation,
                                                              first_dilation))
            self.feature_info.append(dict(chs=self.input_channels, reduction=reduction, name=f"layer{i + 1}",
                                          stage=i + 1))

        self.pool = GlobalAvgPooling()
        self.num_features = self.input_channels
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=lecun_uniform)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], channels: int, num_blocks: int,
                    stride: int = 1, dilation: int = 1, first_dilation: int = 1) -> nn.Sequential:
        out_channels = channels * block.expansion
        down_sample = None
        if stride != 1 or self.input_channels != out_channels:
            down_sample = nn.Sequential(_conv(self.input_channels, out_channels, 1, stride), self.norm(out_channels))
        blocks: List[nn.Module] = [block(self.input_channels, channels, stride, self.groups, self.base_with,
                                         self.norm, down_sample, dilation=dilation, first_dilation=first_dilation)]
        self.input_channels = out_channels
        blocks += [block(out_channels, channels, 1, self.groups, self.base_with, self.norm, dilation=dilation)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv1", classifier="classifier", output_strides=(8, 16, 32),
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters (timm's stem pool pads symmetrically, so
# at even pool-input sizes the pooling windows, and thus the numbers, differ from MindCV's).
_TIMM_TWINS = {n: n for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                             "resnext101_32x4d", "resnext101_64x4d")}

_TIMM_RENAMES = ((r"\.downsample\.", ".down_sample."), (r"^fc\.", "classifier."))


default_cfgs = generate_default_cfgs({
    "resnet18": _cfg(f"{_MS}/resnet/resnet18-1e65cd21.ckpt"),
    "resnet34": _cfg(f"{_MS}/resnet/resnet34-f297d27e.ckpt"),
    "resnet50": _cfg(f"{_MS}/resnet/resnet50-e0733ab8.ckpt"),
    "resnet101": _cfg(f"{_MS}/resnet/resnet101-689c5e77.ckpt"),
    "resnet152": _cfg(f"{_MS}/resnet/resnet152-beb689d8.ckpt"),
    "resnext50_32x4d": _cfg(f"{_MS}/resnext/resnext50_32x4d-af8aba16.ckpt"),
    "resnext101_32x4d": _cfg(f"{_MS}/resnext/resnext101_32x4d-3c1e9c51.ckpt"),
    "resnext101_64x4d": _cfg(f"{_MS}/resnext/resnext101_64x4d-8929255b.ckpt"),
    "resnext152_64x4d": _cfg(f"{_MS}/resnext/resnext152_64x4d-3aba275c.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet18", pretrained, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet34", pretrained, block=BasicBlock, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet50", pretrained, block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet101", pretrained, block=Bottleneck, layers=(3, 4, 23, 3), **kwargs)


@register_model
def resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet152", pretrained, block=Bottleneck, layers=(3, 8, 36, 3), **kwargs)


@register_model
def resnext50_32x4d(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnext50_32x4d", pretrained, block=Bottleneck, layers=(3, 4, 6, 3), groups=32,
                          base_width=4, **kwargs)


@register_model
def resnext101_32x4d(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnext101_32x4d", pretrained, block=Bottleneck, layers=(3, 4, 23, 3), groups=32,
                          base_width=4, **kwargs)


@register_model
def resnext101_64x4d(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnext101_64x4d", pretrained, block=Bottleneck, layers=(3, 4, 23, 3), groups=64,
                          base_width=4, **kwargs)


@register_model
def resnext152_64x4d(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnext152_64x4d", pretrained, block=Bottleneck, layers=(3, 8, 36, 3), groups=64,
                          base_width=4, **kwargs)
