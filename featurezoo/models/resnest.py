"""ResNeSt, with MindCV's module tree and parameter names.

`ResNeSt: Split-Attention Networks <https://arxiv.org/abs/2004.08955>`_. Every
registered variant is a ResNet-D: a deep stem of three 3x3 convs, average-pool
shortcuts (``avg_down``) and the stride moved into a 3x3 average pool after the
split-attention conv (``avd``).

Padding follows MindCV: the stem max pool and the ``avd`` pool use MindSpore's
``same`` mode (extra row at the bottom/right, padded cells not counted), all
convolutions with a kernel above 1 pad symmetrically (``pad_mode="pad"``).

``output_stride=8`` keeps layer3/layer4 at stride 8, and ``output_stride=16``
keeps layer4 at stride 16, replacing their strides by dilation; these are
MindCV's semantic-segmentation settings ``dilated=True`` (or ``dilation=4``) and
``dilation=2``, whose schedule is timm's (a stage's first block keeps the
previous dilation). As MindCV, a dilated stage's first block still applies its
``avd`` pool at stride 1 and its shortcut pool becomes 1x1 (timm pools 2x2 there).
Parameters are the same as the stride-32 model's, so the classifier's weights load.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import fan_out_normal, init_weights, lecun_uniform
from ..layers.padding import AvgPool2d, MaxPool2d
from ..layers.pooling import GlobalAvgPooling
from ..registry import register_model
from .resnet import stage_dilations

__all__ = ["ResNeSt", "Bottleneck", "SplitAttn", "RadixSoftmax"]


class RadixSoftmax(nn.Module):
    """Softmax over the radix splits of each cardinal group (a sigmoid when there is one split)."""

    def __init__(self, radix: int, cardinality: int):
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.radix > 1:
            # Channels arrive cardinality-major; the result is radix-major, as SplitAttn slices it.
            x = x.reshape(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            return torch.softmax(x, dim=1).reshape(batch, -1)
        return self.sigmoid(x)


class SplitAttn(nn.Module):
    """Split-attention conv: ``radix`` grouped conv branches mixed by attention from their pooled sum."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = 0, dilation: int = 1, group: int = 1, bias: bool = False, radix: int = 2,
                 rd_ratio: float = 0.25, rd_channels: Optional[int] = None, rd_divisor: int = 8,
                 act_layer: Type[nn.Module] = nn.ReLU, norm_layer: Optional[Type[nn.Module]] = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.radix = radix
        mid_chs = out_channels * radix
        if rd_channels is None:
            attn_chs = make_divisible(in_channels * radix * rd_ratio, rd_divisor, min_value=32)
        else:
            attn_chs = rd_channels * radix
        padding = kernel_size // 2 if padding is None else padding

        self.conv = nn.Conv2d(in_channels, mid_chs, kernel_size, stride, padding, dilation, groups=group * radix,
                              bias=bias)
        self.bn0 = norm_layer(mid_chs) if norm_layer else nn.Identity()
        self.act0 = act_layer()
        self.fc1 = nn.Conv2d(out_channels, attn_chs, 1, groups=group, bias=True)
        self.bn1 = norm_layer(attn_chs) if norm_layer else nn.Identity()
        self.act1 = act_layer()
        self.fc2 = nn.Conv2d(attn_chs, mid_chs, 1, groups=group, bias=True)
        self.rsoftmax = RadixSoftmax(radix, group)
        self.pool = GlobalAvgPooling(keep_dims=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.conv(x)))
        b, rc, h, w = x.shape
        if self.radix > 1:
            x = x.reshape(b, self.radix, rc // self.radix, h, w)
            x_gap = x.sum(dim=1)
        else:
            x_gap = x
        x_gap = self.act1(self.bn1(self.fc1(self.pool(x_gap))))
        x_attn = self.rsoftmax(self.fc2(x_gap))
        if self.radix > 1:
            return (x * x_attn.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)
        return x * x_attn.reshape(b, -1, 1, 1)


class Bottleneck(nn.Module):
    """ResNeSt bottleneck; with ``avd`` the block's stride is a 3x3 average pool before or after ``conv2``."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 radix: int = 1, cardinality: int = 1, bottleneck_width: int = 64, avd: bool = False,
                 avd_first: bool = False, dilation: int = 1, is_first: bool = False,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.conv1 = nn.Conv2d(inplanes, group_width, 1, bias=False)
        self.bn1 = norm_layer(group_width)
        self.radix = radix
        # is_first: the first block of a stage, where a stride-1 (dilated) stage still gets the 3x3 pool.
        self.avd = avd and (stride > 1 or is_first)
        self.avd_first = avd_first
        if self.avd:
            self.avd_layer = AvgPool2d(3, stride, pad_mode="same")
            stride = 1

        if radix >= 1:
            self.conv2 = SplitAttn(group_width, group_width, kernel_size=3, stride=stride, padding=dilation,
                                   dilation=dilation, group=cardinality, bias=False, radix=radix,
                                   norm_layer=norm_layer)
        else:
            self.conv2 = nn.Conv2d(group_width, group_width, 3, stride, padding=dilation, dilation=dilation,
                                   groups=cardinality, bias=False)
            self.bn2 = norm_layer(group_width)

        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.dilation = dilation
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.avd and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.radix == 0:
            out = self.relu(self.bn2(out))
        if self.avd and not self.avd_first:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def _output_stride(output_stride: int, dilated: bool, dilation: int) -> int:
    """The output stride that ``output_stride`` and MindCV's ``dilated``/``dilation`` settings ask for."""
    if dilated or dilation == 4:
        mindcv = 8
    elif dilation in (1, 2):
        mindcv = 32 // dilation
    else:
        # MindCV silently builds the stride-32 model for any other value; refuse instead.
        raise ValueError(f"ResNeSt: dilation={dilation!r} is not supported; valid: 1 (output stride 32), "
                         f"2 (output stride 16), 4 or dilated=True (output stride 8)")
    if mindcv != 32 and output_stride not in (32, mindcv):
        raise ValueError(f"ResNeSt: output_stride={output_stride!r} contradicts dilated={dilated!r}, "
                         f"dilation={dilation!r} (output stride {mindcv}); give one of them")
    return output_stride if mindcv == 32 else mindcv


class ResNeSt(nn.Module):
    """ResNeSt classifier; ``feature_info``: the stem's ``relu`` and ``layer1``..``layer4``.

    Args:
        block: residual block class (``Bottleneck``).
        layers: blocks per stage.
        radix: split-attention branches (0: a plain grouped 3x3 conv).
        group: cardinality of the 3x3 conv.
        bottleneck_width: width of a cardinal group per 64 planes.
        num_classes, in_channels: classifier outputs, input channels.
        output_stride: 16 (layer4 dilated by 2) or 8 (layer3/layer4 dilated by 2 and 4).
        dilated: MindCV's name for ``output_stride=8``, as ``dilation=4``.
        dilation: MindCV's 1, 2 (``output_stride=16``) or 4 (``output_stride=8``).
        deep_stem, stem_width: three 3x3 stem convs of widths ``stem_width``, ``stem_width``, ``2*stem_width``.
        avg_down: average-pool then 1x1 conv in strided shortcuts.
        avd, avd_first: stride by a 3x3 average pool after (or before) the split-attention conv.
        drop_rate: dropout before the classifier.
        norm_layer: normalisation layer class.

    Example (reductions stop at 8 when dilated)::

        >>> m = ResNeSt(Bottleneck, (1, 1, 1, 1), radix=2, deep_stem=True, stem_width=32, avg_down=True, avd=True,
        ...             output_stride=8)
        >>> [e["reduction"] for e in m.feature_info]
        [2, 4, 8, 8, 8]
    """

    def __init__(self, block: Type[Bottleneck], layers: Tuple[int, ...], radix: int = 1, group: int = 1,
                 bottleneck_width: int = 64, num_classes: int = 1000, in_channels: int = 3, dilated: bool = False,
                 dilation: int = 1, deep_stem: bool = False, stem_width: int = 64, avg_down: bool = False,
                 avd: bool = False, avd_first: bool = False, drop_rate: float = 0.0,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d, output_stride: int = 32):
        super().__init__()
        output_stride = _output_stride(output_stride, dilated, dilation)
        self.cardinality = group
        self.bottleneck_width = bottleneck_width
        self.inplanes = stem_width * 2 if deep_stem else 64
        self.avg_down = avg_down
        self.radix = radix
        self.avd = avd
        self.avd_first = avd_first

        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 3, 2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(),
                nn.Conv2d(stem_width, stem_width, 3, 1, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(),
                nn.Conv2d(stem_width, self.inplanes, 3, 1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU()
        reduction = total_stride(self.conv1)
        self.feature_info = [dict(chs=self.inplanes, reduction=reduction, name="relu")]
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        reduction *= total_stride(self.maxpool)

        plan = stage_dilations(output_stride, reduction, len(layers))
        for i, (planes, num_blocks, (stride, first_dilation, stage_dilation)) in enumerate(
                zip((64, 128, 256, 512), layers, plan)):
            reduction *= stride
            stage = self._make_layer(block, planes, num_blocks, stride, stage_dilation, first_dilation, norm_layer,
                                     is_first=i > 0)
            self.add_module(f"layer{i + 1}", stage)
            self.feature_info.append(dict(chs=self.inplanes, reduction=reduction, name=f"layer{i + 1}",
                                          stage=i + 1))

        self.avgpool = GlobalAvgPooling()
        self.drop = nn.Dropout(p=drop_rate) if drop_rate > 0.0 else None
        self.num_features = self.inplanes
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=lecun_uniform)

    def _make_layer(self, block: Type[Bottleneck], planes: int, num_blocks: int, stride: int, dilation: int,
                    first_dilation: int, norm_layer: Type[nn.Module], is_first: bool) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            down_layers: List[nn.Module] = []
            if self.avg_down:
                # MindCV pools with pad_mode="valid", which floors odd sizes while the avd pool ("same") rounds
                # up, so MindCV fails on them; "same" is identical on even sizes and rounds up like the main
                # path (as the original ResNeSt's ceil_mode=True, count_include_pad=False).
                pool = stride if dilation == 1 else 1
                down_layers.append(AvgPool2d(pool, pool, pad_mode="same"))
                down_layers.append(nn.Conv2d(self.inplanes, out_channels, 1, bias=False))
            else:
                # A 1x1 conv never pads in MindSpore's "same" mode: ceil(size / stride) outputs, as here.
                down_layers.append(nn.Conv2d(self.inplanes, out_channels, 1, stride, bias=False))
            down_layers.append(norm_layer(out_channels))
            downsample = nn.Sequential(*down_layers)

        kwargs = dict(radix=self.radix, cardinality=self.cardinality, bottleneck_width=self.bottleneck_width,
                      avd=self.avd, avd_first=self.avd_first, norm_layer=norm_layer)
        # The first block of a dilated stage keeps the previous dilation: it still sees the previous resolution.
        blocks = [block(self.inplanes, planes, stride, downsample=downsample, dilation=first_dilation,
                        is_first=is_first, **kwargs)]
        self.inplanes = out_channels
        blocks += [block(out_channels, planes, dilation=dilation, **kwargs) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)
        if self.drop is not None:
            x = self.drop(x)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resnest(variant: str, pretrained: bool = False, **kwargs) -> ResNeSt:
    return build_model_with_cfg(ResNeSt, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv1.0", classifier="fc", output_strides=(8, 16, 32),
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "resnest14": _cfg(),
    "resnest26": _cfg(),
    "resnest50": _cfg(f"{_MS}/resnest/resnest50-f2e7fc9c.ckpt"),
    "resnest101": _cfg(f"{_MS}/resnest/resnest101-7cc5c258.ckpt"),
    "resnest200": _cfg(),
    "resnest269": _cfg(),
})

# Every MindCV ResNeSt: split attention with 2 branches, ResNet-D stem and shortcuts, stride in the avd pool.
_RESNEST_D = dict(block=Bottleneck, radix=2, group=1, bottleneck_width=64, deep_stem=True, avg_down=True, avd=True,
                  avd_first=False)


@register_model
def resnest14(pretrained: bool = False, **kwargs) -> ResNeSt:
    return _create_resnest("resnest14", pretrained, layers=(1, 1, 1, 1), stem_width=32, **_RESNEST_D, **kwargs)


@register_model
def resnest26(pretrained: bool = False, **kwargs) -> ResNeSt:
    return _create_resnest("resnest26", pretrained, layers=(2, 2, 2, 2), stem_width=32, **_RESNEST_D, **kwargs)


@register_model
def resnest50(pretrained: bool = False, **kwargs) -> ResNeSt:
    return _create_resnest("resnest50", pretrained, layers=(3, 4, 6, 3), stem_width=32, **_RESNEST_D, **kwargs)


@register_model
def resnest101(pretrained: bool = False, **kwargs) -> ResNeSt:
    return _create_resnest("resnest101", pretrained, layers=(3, 4, 23, 3), stem_width=64, **_RESNEST_D, **kwargs)


@register_model
def resnest200(pretrained: bool = False, **kwargs) -> ResNeSt:
    return _create_resnest("resnest200", pretrained, layers=(3, 24, 36, 3), stem_width=64, **_RESNEST_D, **kwargs)


@register_model
def resnest269(pretrained: bool = False, **kwargs) -> ResNeSt:
    return _create_resnest("resnest269", pretrained, layers=(3, 30, 48, 8), stem_width=64, **_RESNEST_D, **kwargs)
