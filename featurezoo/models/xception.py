"""Xception, with MindCV's module tree and parameter names.

`Xception: Deep Learning with Depthwise Separable Convolutions <https://arxiv.org/abs/1610.02357>`_.

A two-conv stem (unpadded, as in MindCV: 299 px -> 149 -> 147), twelve
residual :class:`Block` s of separable convolutions in ``blocks`` (entry flow:
three stride-2 blocks; middle flow: eight; exit flow: one stride-2 block), then
two separable convs. One ``relu`` module serves the stem and the exit convs.

``feature_info``, the end of each stride: the stem's activated ``bn2`` output
(stride 2), ``blocks.0``, ``blocks.1``, ``blocks.10`` (strides 4, 8, 16: the
residual sums, which the next block activates first) and the activated
``bn4`` output (stride 32). ``bn2`` and ``bn4`` name the BatchNorms whose
output the shared ``relu`` activates, since ``relu`` itself is called four
times. :meth:`Xception.forward_levels` is the classifier's own forward,
stopping after the deepest requested feature.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..cfg import IndexMap
from ..features import take_levels
from ..layers import GlobalAvgPooling, MaxPool2d
from ..layers.init import init_weights, normal, xavier_uniform
from ..registry import register_model

__all__ = ["Xception", "Block", "SeparableConv2d"]


class SeparableConv2d(nn.Module):
    """Depthwise conv (``conv1``) then pointwise 1x1 conv, both without bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """``reps`` x (ReLU, separable 3x3, BN) in ``rep``, a 3x3 max pool if strided; plus a shortcut
    (1x1 conv + BN where width or stride change)."""

    def __init__(self, in_filters: int, out_filters: int, reps: int, strides: int = 1, start_with_relu: bool = True,
                 grow_first: bool = True):
        super().__init__()
        if out_filters != in_filters or strides != 1:
            self.skip = nn.Conv2d(in_filters, out_filters, 1, stride=strides, bias=False)
            self.skipbn = nn.BatchNorm2d(out_filters)
        else:
            self.skip = None
        self.relu = nn.ReLU()  # unused, as in MindCV (parameter-free)

        # Widths of the reps: grow to out_filters at the first rep, or at the last.
        widths = [in_filters] + [out_filters if grow_first else in_filters] * (reps - 1) + [out_filters]
        rep: List[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            rep += [nn.ReLU(), SeparableConv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out)]
        if not start_with_relu:
            rep = rep[1:]
        if strides != 1:
            rep.append(MaxPool2d(3, strides, pad_mode="same"))
        self.rep = nn.Sequential(*rep)
        self.stride = strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + skip


class Xception(nn.Module):
    """Xception classifier; ``feature_info``: ``bn2`` (activated), ``blocks.0``, ``blocks.1``, ``blocks.10``,
    ``bn4`` (activated).

    Args:
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        reduction = self.conv1.stride[0]
        self.feature_info = [dict(chs=self.conv2.out_channels, reduction=reduction, name="bn2")]

        # (in, out, reps, stride, start_with_relu, grow_first): entry, middle and exit flows.
        specs = [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True), (256, 728, 2, 2, True, True)]
        specs += [(728, 728, 3, 1, True, True)] * 8
        specs += [(728, 1024, 2, 2, True, False)]
        blocks = [Block(*spec) for spec in specs]
        # Feature index of the block at each position of ``blocks`` that ends a stride.
        self._feature_at: Dict[int, int] = {}
        for i, block in enumerate(blocks):
            if block.stride != 1 and i > 0:
                self._feature_at[i - 1] = len(self.feature_info)
                self.feature_info.append(dict(chs=specs[i - 1][1], reduction=reduction, name=f"blocks.{i - 1}"))
            reduction *= block.stride
        self.blocks = nn.Sequential(*blocks)

        self.conv3 = SeparableConv2d(specs[-1][1], 1536, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(1536)
        self.conv4 = SeparableConv2d(1536, 2048, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(2048)
        self.num_features = self.conv4.pointwise.out_channels
        self.feature_info.append(dict(chs=self.num_features, reduction=reduction, name="bn4"))

        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=0.5)
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=xavier_uniform, linear=normal(0.01))

    # -- forward ------------------------------------------------------------------------
    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        if 0 in take:
            out.append(x)
        if deepest == 0:
            return out
        for position, block in enumerate(self.blocks):
            x = block(x)
            index = self._feature_at.get(position)
            if index in take:
                out.append(x)
                if index == deepest:
                    return out
        x = self.relu(self.bn3(self.conv3(x)))
        out.append(self.relu(self.bn4(self.conv4(x))))
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every module after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("pool", "dropout", "classifier"):
            delattr(self, name)
        if deepest == len(self.feature_info) - 1:
            return
        for name in ("conv3", "bn3", "conv4", "bn4"):
            delattr(self, name)
        if deepest == 0:
            delattr(self, "blocks")
            return
        last = next(p for p, i in self._feature_at.items() if i == deepest)
        for name in list(self.blocks._modules)[last + 1:]:
            delattr(self.blocks, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_xception(variant: str, pretrained: bool = False, **kwargs) -> Xception:
    return build_model_with_cfg(Xception, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv1", classifier="classifier",
                valid_padding="unpadded stem convolutions", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm's legacy_xception has the same architecture and parameters. Its strided blocks' max pools pad by one
# on every side, which is MindSpore's "same" pool where the pool input is odd: 71 px makes all four of them
# odd (33, 17, 9, 5), and there the numbers agree (the unpadded stem and the symmetric separable convs agree
# at any size).
_TIMM_TWINS = {"xception": "legacy_xception"}

_TIMM_RENAMES = ((r"^block(\d+)\.", IndexMap("blocks.{0}.", (1, -1))), (r"^fc\.", "classifier."))


default_cfgs = generate_default_cfgs({
    "xception": _cfg(f"{_MS}/xception/xception-2c1e711df.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def xception(pretrained: bool = False, **kwargs) -> Xception:
    return _create_xception("xception", pretrained, **kwargs)
