"""Dual Path Networks, with MindCV's module tree and parameter names.

`Dual Path Networks <https://arxiv.org/abs/1707.01629>`_.

Every :class:`DualPathBlock` passes a pair on: a residual path (summed) and a
densely connected path (concatenated, growing by ``inc`` channels a block).
The map a stage hands to the next is that pair concatenated, which is what
MindCV's head does with the last block's pair (then BN + ReLU, ``conv5_x``).

``feature_info``: the stem's ReLU (stride 2, before its max pool), the last
block of ``conv2``..``conv4`` (strides 4, 8, 16; its pair concatenated) and
``conv5_x`` (stride 32). :meth:`DPN.forward_levels` is the classifier's
own forward, stopping after the deepest requested feature.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers import GlobalAvgPooling, MaxPool2d
from ..layers.init import fan_out_normal, init_weights, torch_uniform
from ..registry import register_model

__all__ = ["DPN", "DualPathBlock", "BottleBlock"]

Pair = Tuple[torch.Tensor, torch.Tensor]


def _bn(chs: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(chs, eps=1e-3)  # MindCV: eps 1e-3, momentum 0.9 (torch 0.1)


class BottleBlock(nn.Module):
    """Pre-activation bottleneck whose last 1x1 conv is split: ``conv3_r`` (residual) and ``conv3_d`` (dense)."""

    def __init__(self, in_channel: int, num_1x1_a: int, num_3x3_b: int, num_1x1_c: int, inc: int, g: int,
                 key_stride: int):
        super().__init__()
        self.bn1 = _bn(in_channel)
        self.conv1 = nn.Conv2d(in_channel, num_1x1_a, 1, bias=False)
        self.bn2 = _bn(num_1x1_a)
        self.conv2 = nn.Conv2d(num_1x1_a, num_3x3_b, 3, key_stride, padding=1, groups=g, bias=False)
        self.bn3 = _bn(num_3x3_b)
        self.conv3_r = nn.Conv2d(num_3x3_b, num_1x1_c, 1, bias=False)
        self.conv3_d = nn.Conv2d(num_3x3_b, inc, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> Pair:
        x = self.conv1(self.relu(self.bn1(x)))
        x = self.conv2(self.relu(self.bn2(x)))
        x = self.relu(self.bn3(x))
        return self.conv3_r(x), self.conv3_d(x)


class DualPathBlock(nn.Module):
    """One DPN block: input a pair (or, for the first block, a map), output ``(residual, dense)``.

    ``_type``: ``"proj"`` projects the input to start both paths, ``"down"``
    does so with stride 2, ``"normal"`` adds to the residual path and extends
    the dense one.
    """

    def __init__(self, in_channel: int, num_1x1_a: int, num_3x3_b: int, num_1x1_c: int, inc: int, g: int,
                 _type: str = "normal", cat_input: bool = True):
        super().__init__()
        strides = {"proj": 1, "down": 2, "normal": 1}
        if _type not in strides:
            raise ValueError(f"DualPathBlock: _type={_type!r}; valid: {list(strides)}")
        key_stride = strides[_type]
        self.num_1x1_c = num_1x1_c
        self.has_proj = _type != "normal"
        self.cat_input = cat_input
        if self.has_proj:
            self.c1x1_w_bn = _bn(in_channel)
            self.c1x1_w_relu = nn.ReLU()
            self.c1x1_w_r = nn.Conv2d(in_channel, num_1x1_c, 1, key_stride, bias=False)
            self.c1x1_w_d = nn.Conv2d(in_channel, 2 * inc, 1, key_stride, bias=False)
        self.layers = BottleBlock(in_channel, num_1x1_a, num_3x3_b, num_1x1_c, inc, g, key_stride)

    def forward(self, x: Union[torch.Tensor, Pair]) -> Pair:
        data_in = torch.cat(x, dim=1) if self.cat_input else x
        if self.has_proj:
            proj = self.c1x1_w_relu(self.c1x1_w_bn(data_in))
            resid, dense = self.c1x1_w_r(proj), self.c1x1_w_d(proj)
        else:
            resid, dense = x
        out_r, out_d = self.layers(data_in)
        return resid + out_r, torch.cat((dense, out_d), dim=1)


class DPN(nn.Module):
    """DPN classifier; ``feature_info``: ``features.conv1.relu``, the last block of ``conv2``..``conv4``,
    ``conv5_x``.

    Args:
        num_init_channel: width of the stem conv.
        k_r: bottleneck width of ``conv2`` (scaled with each stage's ``bw``).
        g: groups of the 3x3 convs.
        k_sec: blocks per stage (``conv2``..``conv5``).
        inc_sec: channels each block adds to the dense path, per stage.
        in_channels, num_classes: input channels, classifier outputs.
    """

    def __init__(self, num_init_channel: int = 64, k_r: int = 96, g: int = 32,
                 k_sec: Sequence[int] = (3, 4, 20, 3), inc_sec: Sequence[int] = (16, 32, 24, 128),
                 in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        blocks: Dict[str, nn.Module] = OrderedDict()
        blocks["conv1"] = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_channels, num_init_channel, 7, stride=2, padding=3, bias=False)),
            ("norm", _bn(num_init_channel)),
            ("relu", nn.ReLU()),
            ("maxpool", MaxPool2d(kernel_size=3, stride=2, pad_mode="same")),
        ]))
        reduction = blocks["conv1"].conv.stride[0]
        self.feature_info = [dict(chs=num_init_channel, reduction=reduction, name="features.conv1.relu")]
        reduction *= 2
        # Feature index of each stage's last block, by block name: its pair is concatenated for the output.
        self._stage_ends: Dict[str, int] = {}

        in_channel = num_init_channel
        for s, (num_blocks, inc) in enumerate(zip(k_sec, inc_sec)):
            bw = 256 * 2 ** s
            r = int(k_r * bw / 256)
            # The first block of conv2 takes the stem's map, not a pair; later stages start by striding.
            first = DualPathBlock(in_channel, r, r, bw, inc, g, "proj" if s == 0 else "down", cat_input=s > 0)
            blocks[f"conv{s + 2}_1"] = first
            reduction *= first.layers.conv2.stride[0]
            in_channel = bw + first.c1x1_w_d.out_channels + inc  # residual + projected dense path + growth
            for i in range(2, num_blocks + 1):
                blocks[f"conv{s + 2}_{i}"] = DualPathBlock(in_channel, r, r, bw, inc, g, "normal")
                in_channel += inc
            if s < len(k_sec) - 1:
                self._stage_ends[f"conv{s + 2}_{num_blocks}"] = len(self.feature_info)
                self.feature_info.append(dict(chs=in_channel, reduction=reduction,
                                              name=f"features.conv{s + 2}_{num_blocks}"))

        self.features = nn.Sequential(blocks)
        self.conv5_x = nn.Sequential(OrderedDict([("norm", _bn(in_channel)), ("relu", nn.ReLU())]))
        self.feature_info.append(dict(chs=in_channel, reduction=reduction, name="conv5_x"))
        self.num_features = in_channel
        self.avgpool = GlobalAvgPooling()
        self.classifier = nn.Linear(in_channel, num_classes)
        init_weights(self, conv=fan_out_normal, linear=torch_uniform)

    # -- forward ------------------------------------------------------------------------
    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        stem = self.features.conv1
        x = stem.relu(stem.norm(stem.conv(x)))
        if 0 in take:
            out.append(x)
        if deepest == 0:
            return out
        x = stem.maxpool(x)
        for name, block in self.features.named_children():
            if name == "conv1":
                continue
            x = block(x)
            index = self._stage_ends.get(name)
            if index in take:
                out.append(torch.cat(x, dim=1))
                if index == deepest:
                    return out
        out.append(self.conv5_x(torch.cat(x, dim=1)))
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every module after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("avgpool", "classifier"):
            delattr(self, name)
        if deepest == len(self.feature_info) - 1:
            return
        delattr(self, "conv5_x")
        if deepest == 0:
            delattr(self.features.conv1, "maxpool")
        end = next((n for n, i in self._stage_ends.items() if i == deepest), "conv1")
        names = list(self.features._modules)
        for name in names[names.index(end) + 1:]:
            delattr(self.features, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_dpn(variant: str, pretrained: bool = False, **kwargs) -> DPN:
    return build_model_with_cfg(DPN, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.conv1.conv", classifier="classifier", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "dpn92": _cfg(f"{_MS}/dpn/dpn92-e3e0fca.ckpt"),
    "dpn98": _cfg(f"{_MS}/dpn/dpn98-119a8207.ckpt"),
    "dpn107": _cfg(f"{_MS}/dpn/dpn107-7d7df07b.ckpt"),
    "dpn131": _cfg(f"{_MS}/dpn/dpn131-47f084b3.ckpt"),
})


# No timm twin: timm's dpn92/98/107/131 have the same parameter count but not our tensors: timm's projection
# convs (c1x1_w_s1/_s2) and last 1x1 convs (c1x1_c) are each one conv that MindCV splits in two (c1x1_w_r and
# c1x1_w_d, conv3_r and conv3_d), so those tensors do not map one to one; its classifier is a 1x1 conv (ours
# nn.Linear). Its BN eps, 1e-3, is MindCV's.


@register_model
def dpn92(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn("dpn92", pretrained, num_init_channel=64, k_r=96, g=32, k_sec=(3, 4, 20, 3),
                       inc_sec=(16, 32, 24, 128), **kwargs)


@register_model
def dpn98(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn("dpn98", pretrained, num_init_channel=96, k_r=160, g=40, k_sec=(3, 6, 20, 3),
                       inc_sec=(16, 32, 32, 128), **kwargs)


@register_model
def dpn107(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn("dpn107", pretrained, num_init_channel=128, k_r=200, g=50, k_sec=(4, 8, 20, 3),
                       inc_sec=(20, 64, 64, 128), **kwargs)


@register_model
def dpn131(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn("dpn131", pretrained, num_init_channel=128, k_r=160, g=40, k_sec=(4, 8, 28, 3),
                       inc_sec=(16, 32, 32, 128), **kwargs)
