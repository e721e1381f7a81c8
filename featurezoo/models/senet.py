"""SENet, SE-ResNet and SE-ResNeXt, with MindCV's module tree and parameter names.

`Squeeze-and-Excitation Networks <https://arxiv.org/abs/1709.01507>`_. The
squeeze-excite gate is MindCV's ``SqueezeExciteV2`` (fully connected layers,
reduced width rounded by ``make_divisible(c / 16, 8)``), applied to the
residual branch before the sum. All convolutions pad symmetrically; the stem's
max pool uses MindSpore's ``same`` padding.

``feature_info``: ``layer0`` (the stem, stride 2) and ``layer1``..``layer4``.
``output_stride`` 16 or 8 dilates the last stages as ResNet's (timm's schedule);
SENet-154's 3x3 shortcut conv then keeps its kernel, dilated as the block's first conv.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.helpers import total_stride
from ..layers.init import fan_out_normal, init_weights, lecun_uniform
from ..layers.padding import MaxPool2d
from ..layers.pooling import GlobalAvgPooling
from ..layers.squeeze_excite import SqueezeExciteV2
from ..registry import register_model
from .resnet import stage_dilations

__all__ = ["SENet", "SqueezeExciteV2", "SEBottleneck", "SEResNetBottleneck", "SEResNeXtBottleneck",
           "SEResNetBlock"]


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
          padding: Optional[int] = None, dilation: int = 1) -> nn.Conv2d:
    padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=padding, dilation=dilation, groups=groups,
                     bias=False)


class _SEBottleneckBase(nn.Module):
    """``relu(se(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + shortcut(x))``."""

    expansion: int = 4

    def _build(self, in_channels: int, mid1: int, mid2: int, out_channels: int, group: int, reduction: int,
               stride: int, downsample: Optional[nn.Module], dilation: int = 1) -> None:
        self.conv1 = _conv(in_channels, mid1, 1)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.conv2 = _conv(mid1, mid2, 3, stride, group, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.conv3 = _conv(mid2, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.se_module = SqueezeExciteV2(out_channels, rd_ratio=1.0 / reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.se_module(out) + shortcut)


class SEBottleneck(_SEBottleneckBase):
    """SENet-154's bottleneck: widths ``2c -> 4c -> 4c``."""

    def __init__(self, in_channels: int, channels: int, group: int, reduction: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self._build(in_channels, channels * 2, channels * 4, channels * 4, group, reduction, stride, downsample,
                    first_dilation or dilation)


class SEResNetBottleneck(_SEBottleneckBase):
    """ResNet bottleneck (stride in the 3x3 conv) with squeeze-excite."""

    def __init__(self, in_channels: int, channels: int, group: int, reduction: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self._build(in_channels, channels, channels, channels * 4, group, reduction, stride, downsample,
                    first_dilation or dilation)


class SEResNeXtBottleneck(_SEBottleneckBase):
    """ResNeXt bottleneck (``group`` x ``base_width`` per 64 channels) with squeeze-excite."""

    def __init__(self, in_channels: int, channels: int, group: int, reduction: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, base_width: int = 4, dilation: int = 1,
                 first_dilation: Optional[int] = None):
        super().__init__()
        width = math.floor(channels * (base_width / 64)) * group
        self._build(in_channels, width, width, channels * 4, group, reduction, stride, downsample,
                    first_dilation or dilation)


class SEResNetBlock(nn.Module):
    """ResNet basic block with squeeze-excite."""

    expansion: int = 1

    def __init__(self, in_channels: int, channels: int, group: int, reduction: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self.conv1 = _conv(in_channels, channels, 3, stride, dilation=first_dilation or dilation)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv(channels, channels, 3, groups=group, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.se_module = SqueezeExciteV2(channels, rd_ratio=1.0 / reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.se_module(out) + shortcut)


_Block = Type[Union[SEBottleneck, SEResNetBottleneck, SEResNeXtBottleneck, SEResNetBlock]]


class SENet(nn.Module):
    """SENet classifier; ``feature_info``: ``layer0`` and ``layer1``..``layer4``.

    Args:
        block: the residual block class.
        layers: blocks per stage.
        group: groups of each block's 3x3 conv.
        reduction: squeeze-excite reduction ratio.
        drop_rate: dropout before the classifier.
        in_channels: input channels.
        inplanes: channels entering ``layer1`` (the stem's output).
        input3x3: a stem of three 3x3 convs instead of one 7x7.
        downsample_kernel_size, downsample_padding: the shortcut conv of ``layer2``..``layer4``.
        num_classes: classifier outputs.
        output_stride: 16 or 8 dilates the last stage(s) instead of striding them.
    """

    def __init__(self, block: _Block, layers: Sequence[int], group: int, reduction: int, drop_rate: float = 0.0,
                 in_channels: int = 3, inplanes: int = 64, input3x3: bool = False, downsample_kernel_size: int = 1,
                 downsample_padding: int = 0, num_classes: int = 1000, output_stride: int = 32):
        super().__init__()
        self.inplanes = inplanes
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        if input3x3:
            self.layer0 = nn.Sequential(
                _conv(in_channels, 64, 3, 2), nn.BatchNorm2d(64), nn.ReLU(),
                _conv(64, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
                _conv(64, inplanes, 3), nn.BatchNorm2d(inplanes), nn.ReLU(),
            )
        else:
            self.layer0 = nn.Sequential(_conv(in_channels, inplanes, 7, 2), nn.BatchNorm2d(inplanes), nn.ReLU())
        reduction_hw = total_stride(self.layer0)
        self.feature_info = [dict(chs=inplanes, reduction=reduction_hw, name="layer0")]
        self.pool0 = MaxPool2d(3, stride=2, pad_mode="same")
        reduction_hw *= total_stride(self.pool0)
        plan = stage_dilations(output_stride, reduction_hw, len(layers))
        for i, (planes, num_blocks, (stride, first_dilation, dilation)) in enumerate(
                zip((64, 128, 256, 512), layers, plan)):
            reduction_hw *= stride
            # layer1's shortcut is always a 1x1 conv, as in MindCV.
            kernel, padding = (1, 0) if i == 0 else (downsample_kernel_size, downsample_padding)
            self.add_module(f"layer{i + 1}", self._make_layer(block, planes, num_blocks, group, reduction, stride,
                                                              kernel, padding, dilation, first_dilation))
            self.feature_info.append(dict(chs=self.inplanes, reduction=reduction_hw, name=f"layer{i + 1}",
                                          stage=i + 1))

        self.num_features = self.inplanes
        self.pool = GlobalAvgPooling()
        if drop_rate > 0.0:
            self.dropout = nn.Dropout(p=drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=lecun_uniform)

    def _make_layer(self, block: _Block, planes: int, blocks: int, group: int, reduction: int, stride: int = 1,
                    downsample_kernel_size: int = 1, downsample_padding: int = 0, dilation: int = 1,
                    first_dilation: int = 1) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            # A k>1 shortcut conv (SENet-154's 3x3) sees what the block's first conv sees: dilated alike (timm's
            # downsample_conv), its padding grown by the dilation's extra reach.
            k = downsample_kernel_size
            dil = first_dilation if k > 1 else 1
            downsample = nn.Sequential(
                _conv(self.inplanes, out_channels, k, stride, padding=downsample_padding + (dil - 1) * (k - 1) // 2,
                      dilation=dil), nn.BatchNorm2d(out_channels))
        layers: List[nn.Module] = [block(self.inplanes, planes, group, reduction, stride, downsample,
                                         dilation=dilation, first_dilation=first_dilation)]
        self.inplanes = out_channels
        layers += [block(self.inplanes, planes, group, reduction, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.layer0(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.drop_rate > 0.0:
            x = self.dropout(x)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_senet(variant: str, pretrained: bool = False, **kwargs) -> SENet:
    return build_model_with_cfg(SENet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="layer0.0", classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "senet154": _cfg(),
    "seresnet18": _cfg(f"{_MS}/senet/seresnet18-7880643b.ckpt"),
    "seresnet34": _cfg(f"{_MS}/senet/seresnet34-8179d3c9.ckpt"),
    "seresnet50": _cfg(f"{_MS}/senet/seresnet50-ff9cd214.ckpt"),
    "seresnet101": _cfg(),
    "seresnet152": _cfg(),
    "seresnext26_32x4d": _cfg(f"{_MS}/senet/seresnext26_32x4d-5361f5b6.ckpt"),
    "seresnext50_32x4d": _cfg(f"{_MS}/senet/seresnext50_32x4d-fdc35aca.ckpt"),
    "seresnext101_32x4d": _cfg(),
})


# No timm twin: timm's seresnet18/34/50/101/152, seresnext50/101_32x4d, senet154 and legacy_seresnext26_32x4d
# have the same architecture and parameters, but their squeeze-excite layers are 1x1 convs with (out, in, 1, 1)
# weights where ours (nn.Linear, as MindCV's SqueezeExciteV2) are (out, in): those tensors would need reshaping,
# so they do not map one to one (tests/test_resnet_variants.py loads seresnet50's with that fix-up).


@register_model
def senet154(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("senet154", pretrained, block=SEBottleneck, layers=(3, 8, 36, 3), group=64, reduction=16,
                         downsample_kernel_size=3, downsample_padding=1, inplanes=128, input3x3=True, **kwargs)


@register_model
def seresnet18(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnet18", pretrained, block=SEResNetBlock, layers=(2, 2, 2, 2), group=1, reduction=16,
                         **kwargs)


@register_model
def seresnet34(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnet34", pretrained, block=SEResNetBlock, layers=(3, 4, 6, 3), group=1, reduction=16,
                         **kwargs)


@register_model
def seresnet50(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnet50", pretrained, block=SEResNetBottleneck, layers=(3, 4, 6, 3), group=1,
                         reduction=16, **kwargs)


@register_model
def seresnet101(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnet101", pretrained, block=SEResNetBottleneck, layers=(3, 4, 23, 3), group=1,
                         reduction=16, **kwargs)


@register_model
def seresnet152(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnet152", pretrained, block=SEResNetBottleneck, layers=(3, 8, 36, 3), group=1,
                         reduction=16, **kwargs)


@register_model
def seresnext26_32x4d(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnext26_32x4d", pretrained, block=SEResNeXtBottleneck, layers=(2, 2, 2, 2), group=32,
                         reduction=16, **kwargs)


@register_model
def seresnext50_32x4d(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnext50_32x4d", pretrained, block=SEResNeXtBottleneck, layers=(3, 4, 6, 3), group=32,
                         reduction=16, **kwargs)


@register_model
def seresnext101_32x4d(pretrained: bool = False, **kwargs) -> SENet:
    return _create_senet("seresnext101_32x4d", pretrained, block=SEResNeXtBottleneck, layers=(3, 4, 23, 3),
                         group=32, reduction=16, **kwargs)
