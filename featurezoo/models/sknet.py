"""SKNet (Selective Kernel ResNets), with MindCV's module tree and parameter names.

`Selective Kernel Networks <https://arxiv.org/abs/1903.06586>`_, in the form
MindCV took from timm: each selective-kernel conv has a 3x3 and a dilated
3x3 path (the "5x5"), optionally fed half of the input channels each
(``split_input``), mixed by a softmax attention over the paths.

As in MindCV the model is its ResNet with selective-kernel blocks, so
``feature_info`` is ResNet's (the stem's ``relu`` and ``layer1``..``layer4``).
Two MindCV particularities are kept: the bottleneck's first 1x1 conv has no
activation, and ``skresnext50_32x4d`` passes no cardinality (its convs are
not grouped: it differs from ``skresnet50`` only in its attention widths and
unsplit input).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.conv_norm_act import Conv2dNormActivation
from ..layers.helpers import make_divisible
from ..layers.pooling import GlobalAvgPooling
from ..layers.split import Split
from ..registry import register_model
from .resnet import ResNet

__all__ = ["SKNet", "SelectiveKernel", "SelectiveKernelAttn", "SelectiveKernelBasic", "SelectiveKernelBottleneck"]


class SelectiveKernelAttn(nn.Module):
    """Attention over ``num_paths`` stacked path outputs ``(B, paths, C, H, W)``: softmax across paths of
    ``fc_select(act(bn(fc_reduce(mean_hw(sum_paths(x))))))``."""

    def __init__(self, channels: int, num_paths: int = 2, attn_channels: int = 32,
                 activation: type = nn.ReLU, norm: type = nn.BatchNorm2d):
        super().__init__()
        self.num_paths = num_paths
        self.mean = GlobalAvgPooling(keep_dims=True)
        self.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False)
        self.bn = norm(attn_channels)
        self.act = activation()
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, 1, bias=False)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc_select(self.act(self.bn(self.fc_reduce(self.mean(x.sum(1))))))
        b, c, h, w = x.shape
        return self.softmax(x.reshape(b, self.num_paths, c // self.num_paths, h, w))


class SelectiveKernel(nn.Module):
    """Selective kernel convolution.

    Args:
        in_channels, out_channels: module input and output channels.
        kernel_size: kernel of each path (default ``[3, 5]``); with ``keep_3x3``
            every path is a 3x3 conv dilated to the same receptive field.
        stride, dilation, groups: of every path.
        rd_ratio, rd_channels, rd_divisor: attention width, ``rd_channels`` or
            ``make_divisible(out_channels * rd_ratio, rd_divisor)``.
        split_input: feed each path its own equal share of the input channels.
        activation, norm: of the paths.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None,
                 kernel_size: Union[int, Sequence[int], None] = None, stride: int = 1, dilation: int = 1,
                 groups: int = 1, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None, rd_divisor: int = 8,
                 keep_3x3: bool = True, split_input: bool = True, activation: type = nn.ReLU,
                 norm: type = nn.BatchNorm2d):
        super().__init__()
        out_channels = out_channels or in_channels
        kernel_size = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else (
            [kernel_size] * 2 if kernel_size else [3, 5])
        bad = [k for k in kernel_size if k < 3 or k % 2 == 0]
        if bad:
            raise ValueError(f"SelectiveKernel: kernel sizes must be odd and at least 3, got {kernel_size}")
        if keep_3x3:
            dilations = [dilation * (k - 1) // 2 for k in kernel_size]
            kernel_size = [3] * len(kernel_size)
        else:
            dilations = [dilation] * len(kernel_size)
        self.num_paths = len(kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.split_input = split_input
        if split_input:
            if in_channels % self.num_paths:
                raise ValueError(f"SelectiveKernel: split_input needs in_channels ({in_channels}) divisible by "
                                 f"the number of paths ({self.num_paths})")
            in_channels //= self.num_paths
        groups = min(out_channels, groups)
        self.split = Split(self.in_channels // self.num_paths, self.num_paths, axis=1)
        self.paths = nn.ModuleList(
            Conv2dNormActivation(in_channels, out_channels, kernel_size=k, stride=stride, groups=groups, dilation=d,
                                 activation=activation, norm=norm)
            for k, d in zip(kernel_size, dilations)
        )
        attn_channels = rd_channels or make_divisible(out_channels * rd_ratio, rd_divisor)
        self.attn = SelectiveKernelAttn(out_channels, self.num_paths, attn_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.split(x) if self.split_input else [x] * self.num_paths
        x = torch.stack([path(xi) for path, xi in zip(self.paths, inputs)], dim=1)
        return (x * self.attn(x)).sum(1)


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int, norm: type, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                                   dilation=dilation, bias=False), norm(out_chs))


class SelectiveKernelBasic(nn.Module):
    """Basic block: selective-kernel conv (with its own BN + ReLU), then 3x3 conv + BN."""

    expansion: int = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 down_sample: Optional[nn.Module] = None, base_width: int = 64, norm: Optional[type] = None,
                 sk_kwargs: Optional[Dict[str, Any]] = None, dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"SelectiveKernelBasic supports only groups=1 and base_width=64, got {groups}, "
                             f"{base_width}")
        norm = norm or nn.BatchNorm2d
        self.conv1 = SelectiveKernel(in_channels, out_channels, stride=stride, dilation=first_dilation or dilation,
                                     **(sk_kwargs or {}))
        self.conv2 = _conv_bn(out_channels, out_channels * self.expansion, 3, norm, dilation)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down_sample is None else self.down_sample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class SelectiveKernelBottleneck(nn.Module):
    """Bottleneck: 1x1 conv + BN (no activation, as MindCV), selective-kernel conv, 1x1 conv + BN."""

    expansion: int = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, down_sample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, norm: Optional[type] = None,
                 sk_kwargs: Optional[Dict[str, Any]] = None, dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        norm = norm or nn.BatchNorm2d
        width = int(out_channels * (base_width / 64.0)) * groups
        self.conv1 = _conv_bn(in_channels, width, 1, norm)
        self.conv2 = SelectiveKernel(width, width, stride=stride, dilation=first_dilation or dilation, groups=groups,
                                     **(sk_kwargs or {}))
        self.conv3 = _conv_bn(width, out_channels * self.expansion, 1, norm)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down_sample is None else self.down_sample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


_Block = Type[Union[SelectiveKernelBasic, SelectiveKernelBottleneck]]


class SKNet(ResNet):
    """ResNet with selective-kernel blocks; ``sk_kwargs`` go to every :class:`SelectiveKernel`
    (``output_stride``: as :class:`~featurezoo.models.resnet.ResNet`; a dilated selective-kernel conv
    scales both paths' dilations)."""

    def __init__(self, block: _Block, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3,
                 groups: int = 1, base_width: int = 64, norm: Optional[type] = None,
                 sk_kwargs: Optional[Dict[str, Any]] = None, output_stride: int = 32):
        # ResNet.__init__ builds the stages through our _make_layer, which reads this.
        self.sk_kwargs = dict(sk_kwargs or {})
        super().__init__(block, layers, num_classes, in_channels, groups, base_width, norm, output_stride)

    def _make_layer(self, block: _Block, channels: int, num_blocks: int, stride: int = 1, dilation: int = 1,
                    first_dilation: int = 1) -> nn.Sequential:
        out_channels = channels * block.expansion
        down_sample = None
        if stride != 1 or self.input_channels != out_channels:
            down_sample = nn.Sequential(nn.Conv2d(self.input_channels, out_channels, 1, stride, bias=False),
                                        self.norm(out_channels))
        common = dict(groups=self.groups, base_width=self.base_with, norm=self.norm, sk_kwargs=self.sk_kwargs)
        blocks: List[nn.Module] = [block(self.input_channels, channels, stride=stride, down_sample=down_sample,
                                         dilation=dilation, first_dilation=first_dilation, **common)]
        self.input_channels = out_channels
        blocks += [block(out_channels, channels, dilation=dilation, **common) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)


def _create_sknet(variant: str, pretrained: bool = False, **kwargs) -> SKNet:
    return build_model_with_cfg(SKNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv1", classifier="classifier", output_strides=(8, 16, 32),
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters (timm's stem max pool pads by one on every side,
# MindSpore's "same" pool where the stem output is odd, e.g. 65 px). Not twins: skresnet50, whose tensors match
# timm's one for one, but whose bottleneck has no activation after its first 1x1 conv in MindCV (timm's has a
# ReLU), a layer fewer that timm's weights were not trained for (randomised, the logits differ by several times
# their range); skresnext50_32x4d, which MindCV builds ungrouped (timm's is grouped: other shapes).
_TIMM_TWINS = {"skresnet18": "skresnet18", "skresnet34": "skresnet34"}

_TIMM_RENAMES = (
    (r"\.paths\.(\d)\.conv\.", r".paths.\1.features.0."), (r"\.paths\.(\d)\.bn\.", r".paths.\1.features.1."),
    (r"\.conv2\.conv\.", ".conv2.0."), (r"\.conv2\.bn\.", ".conv2.1."), (r"\.downsample\.", ".down_sample."),
    (r"^fc\.", "classifier."),
)


default_cfgs = generate_default_cfgs({
    "skresnet18": _cfg(f"{_MS}/sknet/sknet18-868228e5.ckpt"),
    "skresnet34": _cfg(f"{_MS}/sknet/skresnet34-d668b629.ckpt"),
    "skresnet50": _cfg(),
    "skresnext50_32x4d": _cfg(f"{_MS}/sknet/skresnext50_32x4d-395413a2.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def skresnet18(pretrained: bool = False, **kwargs) -> SKNet:
    return _create_sknet("skresnet18", pretrained, block=SelectiveKernelBasic, layers=(2, 2, 2, 2),
                         sk_kwargs=dict(rd_ratio=1 / 8, rd_divisor=16, split_input=True), **kwargs)


@register_model
def skresnet34(pretrained: bool = False, **kwargs) -> SKNet:
    return _create_sknet("skresnet34", pretrained, block=SelectiveKernelBasic, layers=(3, 4, 6, 3),
                         sk_kwargs=dict(rd_ratio=1 / 8, rd_divisor=16, split_input=True), **kwargs)


@register_model
def skresnet50(pretrained: bool = False, **kwargs) -> SKNet:
    return _create_sknet("skresnet50", pretrained, block=SelectiveKernelBottleneck, layers=(3, 4, 6, 3),
                         sk_kwargs=dict(split_input=True), **kwargs)


@register_model
def skresnext50_32x4d(pretrained: bool = False, **kwargs) -> SKNet:
    # MindCV passes no groups/base_width here: the model is not grouped despite its name.
    return _create_sknet("skresnext50_32x4d", pretrained, block=SelectiveKernelBottleneck, layers=(3, 4, 6, 3),
                         sk_kwargs=dict(rd_ratio=1 / 16, rd_divisor=32, split_input=False), **kwargs)
