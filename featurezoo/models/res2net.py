"""Res2Net and Res2Net-v1b, with MindCV's module tree and parameter names.

`Res2Net: A New Multi-scale Backbone Architecture <https://arxiv.org/abs/1904.01169>`_:
a bottleneck whose 3x3 conv is split into ``scale`` channel groups processed
hierarchically (26w x 4s for every registered variant). ``v1b`` adds MindCV's
deep stem (three 3x3 convs) and average-pool shortcuts.

Padding follows MindCV: the stem's max pool and the first block's pass-through
average pool zero-pad by one and pool ``valid`` (so the average counts the
padding), the v1b shortcut pool is ``same`` (padded cells not counted).

``feature_info``: the stem's ``relu`` and ``layer1``..``layer4``.

``output_stride`` 16 or 8 dilates the last stages as timm's Res2Net: a dilated
stage's first block still pools its last split (stride 1), and v1b's shortcut
pool becomes a 2x2 stride-1 ``same`` pool (the module tree, and so the
parameter names, stay the stride-32 model's).
"""
from __future__ import annotations

import math
from typing import List, Optional, Type

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..checkpoint.mapping import rename_by_rules
from ..layers.helpers import total_stride
from ..layers.init import fan_out_normal, init_weights, torch_uniform
from ..layers.padding import AvgPool2d
from ..layers.pooling import GlobalAvgPooling
from ..layers.split import Split
from ..registry import register_model
from .resnet import stage_dilations

__all__ = ["Res2Net", "Bottle2neck"]

VERSIONS = ("res2net", "res2net_v1b")


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    # MindSpore's "same" padding of a 1x1 conv is zero at any stride.
    return nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)


class Bottle2neck(nn.Module):
    """Res2Net bottleneck.

    ``stype="stage"`` (first block of a stage) feeds each split to its own conv
    and average-pools the last split; ``"normal"`` adds the previous split's
    output to each split before its conv and passes the last split through.
    """

    expansion: int = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, base_width: int = 26,
                 scale: int = 4, stype: str = "normal", norm: Optional[Type[nn.Module]] = None,
                 down_sample: Optional[nn.Module] = None, dilation: int = 1):
        super().__init__()
        if stype not in ("normal", "stage"):
            raise ValueError(f"Bottle2neck: stype must be 'normal' or 'stage', got {stype!r}")
        norm = norm or nn.BatchNorm2d
        width = int(math.floor(out_channels * (base_width / 64.0))) * groups

        self.conv1 = _conv1x1(in_channels, width * scale)
        self.bn1 = norm(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        if stype == "stage":
            self.pool = nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.AvgPool2d(kernel_size=3, stride=stride))
        self.convs = nn.ModuleList(_conv3x3(width, width, stride, dilation) for _ in range(self.nums))
        self.bns = nn.ModuleList(norm(width) for _ in range(self.nums))
        self.conv3 = _conv1x1(width * scale, out_channels * self.expansion)
        self.bn3 = norm(out_channels * self.expansion)
        self.relu = nn.ReLU()
        self.down_sample = down_sample
        self.stype = stype
        self.scale = scale
        self.width = width
        self.split = Split(width, scale, axis=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down_sample is None else self.down_sample(x)
        spx = self.split(self.relu(self.bn1(self.conv1(x))))
        sp = self.relu(self.bns[0](self.convs[0](spx[0])))
        outs = [sp]
        for i in range(1, self.nums):
            sp = spx[i] if self.stype == "stage" else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            outs.append(sp)
        if self.scale != 1:
            outs.append(self.pool(spx[self.nums]) if self.stype == "stage" else spx[self.nums])
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        return self.relu(out + identity)


class Res2Net(nn.Module):
    """Res2Net classifier; ``feature_info``: the stem's ``relu`` and ``layer1``..``layer4``.

    Args:
        block: ``Bottle2neck``.
        layer_nums: blocks per stage.
        version: ``"res2net"`` (7x7 stem, conv shortcuts) or ``"res2net_v1b"``
            (three 3x3 stem convs, average-pool shortcuts).
        num_classes, in_channels: classifier outputs, input channels.
        groups, base_width, scale: cardinality, width per split and number of splits.
        norm: normalisation layer class (``nn.BatchNorm2d``).
        output_stride: 16 or 8 dilates the last stage(s) instead of striding them.
    """

    def __init__(self, block: Type[Bottle2neck] = Bottle2neck, layer_nums=(3, 4, 6, 3), version: str = "res2net",
                 num_classes: int = 1000, in_channels: int = 3, groups: int = 1, base_width: int = 26,
                 scale: int = 4, norm: Optional[Type[nn.Module]] = None, output_stride: int = 32):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"Res2Net: version must be one of {list(VERSIONS)}, got {version!r}")
        self.version = version
        self.norm = norm or nn.BatchNorm2d
        self.num_classes = num_classes
        self.input_channels = 64
        self.groups = groups
        self.base_width = base_width
        self.scale = scale

        if version == "res2net":
            self.conv1 = nn.Conv2d(in_channels, self.input_channels, 7, 2, padding=3, bias=False)
        else:
            stem = self.input_channels // 2
            self.conv1 = nn.Sequential(
                _conv3x3(in_channels, stem, 2), self.norm(stem), nn.ReLU(),
                _conv3x3(stem, stem), self.norm(stem), nn.ReLU(),
                _conv3x3(stem, self.input_channels),
            )
        self.bn1 = self.norm(self.input_channels)
        self.relu = nn.ReLU()
        reduction = total_stride(self.conv1)
        self.feature_info = [dict(chs=self.input_channels, reduction=reduction, name="relu")]
        # The stem output is a ReLU's, so zero padding never wins the max: a "same" pool.
        self.max_pool = nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(kernel_size=3, stride=2))
        reduction *= total_stride(self.max_pool)
        plan = stage_dilations(output_stride, reduction, len(layer_nums))
        for i, (channels, num_blocks, (stride, first_dilation, dilation)) in enumerate(
                zip((64, 128, 256, 512), layer_nums, plan)):
            reduction *= stride
            self.add_module(f"layer{i + 1}", self._make_layer(block, channels, num_blocks, stride, dilation,
                                                              first_dilation))
            self.feature_info.append(dict(chs=self.input_channels, reduction=reduction, name=f"layer{i + 1}",
                                          stage=i + 1))

        self.pool = GlobalAvgPooling()
        self.num_features = self.input_channels
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=torch_uniform)

    def _make_layer(self, block: Type[Bottle2neck], channels: int, num_blocks: int, stride: int = 1,
                    dilation: int = 1, first_dilation: int = 1) -> nn.Sequential:
        out_channels = channels * block.expansion
        down_sample = None
        if stride != 1 or self.input_channels != out_channels:
            if (stride == 1 and dilation == 1) or self.version == "res2net":
                down_sample = nn.Sequential(_conv1x1(self.input_channels, out_channels, stride),
                                            self.norm(out_channels))
            else:
                # A dilated stage keeps its shortcut pool, 2x2 at stride 1 (timm's downsample_avg), so
                # the conv and BN keep their names; padded cells are not counted, as at stride 2.
                kernel = stride if dilation == 1 else 2
                down_sample = nn.Sequential(AvgPool2d(kernel_size=kernel, stride=stride, pad_mode="same"),
                                            _conv1x1(self.input_channels, out_channels), self.norm(out_channels))
        blocks: List[nn.Module] = [block(self.input_channels, channels, stride, self.groups, self.base_width,
                                         self.scale, "stage", self.norm, down_sample, first_dilation)]
        self.input_channels = out_channels
        blocks += [block(out_channels, channels, 1, self.groups, self.base_width, self.scale, "normal", self.norm,
                         dilation=dilation) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_res2net(variant: str, pretrained: bool = False, **kwargs) -> Res2Net:
    return build_model_with_cfg(Res2Net, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", first_conv: str = "conv1", **kwargs):
    return dict(url=url, num_classes=1000, first_conv=first_conv, classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters (timm has no 152-layer Res2Net). Both pad every conv
# and pool symmetrically where MindCV does (the stem pool's zero padding never wins the max after a ReLU, and
# the "same" 2x2 shortcut pool of v1b counts only real cells, as timm's ceil-mode pool): any size computes the same.
_TIMM_TWINS = {"res2net50": "res2net50_26w_4s", "res2net101": "res2net101_26w_4s",
              "res2net50_v1b": "res2net50d", "res2net101_v1b": "res2net101d"}

_TIMM_RENAMES = ((r"\.downsample\.", ".down_sample."), (r"^fc\.", "classifier."))

# timm's v1b (res2net*d) keeps an Identity in place of layer1's stride-1 shortcut pool: its conv and BN are
# down_sample.1/.2 there, ours .0/.1.
_TIMM_V1B_LAYER1 = ((r"^layer1\.0\.downsample\.1\.", "layer1.0.down_sample.0."),
                    (r"^layer1\.0\.downsample\.2\.", "layer1.0.down_sample.1."))


def _convert_from_timm(state_dict):
    v1b = "layer1.0.downsample.2.weight" in state_dict
    return rename_by_rules(state_dict, (_TIMM_V1B_LAYER1 if v1b else ()) + _TIMM_RENAMES)


default_cfgs = generate_default_cfgs({
    "res2net50": _cfg(f"{_MS}/res2net/res2net50-f42cf71b.ckpt"),
    "res2net101": _cfg(f"{_MS}/res2net/res2net101-8ae60132.ckpt"),
    "res2net152": _cfg(),
    # MindCV names "conv1", which is the v1b stem's container; ours names its first conv.
    "res2net50_v1b": _cfg(f"{_MS}/res2net/res2net50_v1b-99304e92.ckpt", first_conv="conv1.0"),
    "res2net101_v1b": _cfg(f"{_MS}/res2net/res2net101_v1b-7e6db001.ckpt", first_conv="conv1.0"),
    "res2net152_v1b": _cfg(first_conv="conv1.0"),
}, timm_twins=_TIMM_TWINS, timm_convert=_convert_from_timm)


@register_model
def res2net50(pretrained: bool = False, **kwargs) -> Res2Net:
    return _create_res2net("res2net50", pretrained, layer_nums=(3, 4, 6, 3), **kwargs)


@register_model
def res2net101(pretrained: bool = False, **kwargs) -> Res2Net:
    return _create_res2net("res2net101", pretrained, layer_nums=(3, 4, 23, 3), **kwargs)


@register_model
def res2net152(pretrained: bool = False, **kwargs) -> Res2Net:
    return _create_res2net("res2net152", pretrained, layer_nums=(3, 8, 36, 3), **kwargs)


@register_model
def res2net50_v1b(pretrained: bool = False, **kwargs) -> Res2Net:
    return _create_res2net("res2net50_v1b", pretrained, layer_nums=(3, 4, 6, 3), version="res2net_v1b", **kwargs)


@register_model
def res2net101_v1b(pretrained: bool = False, **kwargs) -> Res2Net:
    return _create_res2net("res2net101_v1b", pretrained, layer_nums=(3, 4, 23, 3), version="res2net_v1b",
                           **kwargs)


@register_model
def res2net152_v1b(pretrained: bool = False, **kwargs) -> Res2Net:
    return _create_res2net("res2net152_v1b", pretrained, layer_nums=(3, 8, 36, 3), version="res2net_v1b",
                           **kwargs)
