"""Inception v3, with MindCV's module tree and parameter names.

`Rethinking the Inception Architecture for Computer Vision <https://arxiv.org/abs/1512.00567>`_.

As in MindCV: the stem and every stride-2 layer are unpadded (``valid``), so
maps are smaller than ``size / reduction`` (299 px: 149, 73, 35, 17, 8) and the
model needs at least 75 px; the auxiliary classifier (``aux``, built by
default, used only in training) reads ``inception6e`` and needs 299 px.

``feature_info``: ``conv2b`` (stride 2), ``conv4a`` (4), ``inception5d`` (8),
``inception6e`` (16), ``inception7c`` (32): the last module at each stride,
the same layers as timm's ``inception_v3``. :meth:`InceptionV3.forward_levels`
is the classifier's own forward; it stops after the deepest requested feature
and never runs the auxiliary head.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers import AvgPool2d, GlobalAvgPooling, MaxPool2d
from ..layers.conv_norm_act import BasicConv2d
from ..layers.init import init_weights, xavier_uniform
from ..registry import register_model

__all__ = ["InceptionV3"]


def _width(*branches: nn.Module) -> int:
    """Channels of the concatenated outputs of branches that end in a :class:`BasicConv2d`."""
    return sum((b[-1] if isinstance(b, nn.Sequential) else b).out_channels for b in branches)


def _avg_pool_branch(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(AvgPool2d(3, 1, pad_mode="same"), BasicConv2d(in_channels, out_channels, 1))


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch0 = BasicConv2d(in_channels, 64, 1)
        self.branch1 = nn.Sequential(BasicConv2d(in_channels, 48, 1), BasicConv2d(48, 64, 5))
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, 64, 1), BasicConv2d(64, 96, 3),
                                     BasicConv2d(96, 96, 3))
        self.branch_pool = _avg_pool_branch(in_channels, pool_features)
        self.out_channels = _width(self.branch0, self.branch1, self.branch2, self.branch_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch_pool(x)), dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (stride 2, unpadded)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch0 = BasicConv2d(in_channels, 384, 3, stride=2, pad_mode="valid")
        self.branch1 = nn.Sequential(BasicConv2d(in_channels, 64, 1), BasicConv2d(64, 96, 3),
                                     BasicConv2d(96, 96, 3, stride=2, pad_mode="valid"))
        self.branch_pool = MaxPool2d(3, 2)
        self.out_channels = _width(self.branch0, self.branch1) + in_channels  # + the max pool branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch_pool(x)), dim=1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch0 = BasicConv2d(in_channels, 192, 1)
        self.branch1 = nn.Sequential(BasicConv2d(in_channels, c7, 1), BasicConv2d(c7, c7, (1, 7)),
                                     BasicConv2d(c7, 192, (7, 1)))
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, c7, 1), BasicConv2d(c7, c7, (7, 1)),
                                     BasicConv2d(c7, c7, (1, 7)), BasicConv2d(c7, c7, (7, 1)),
                                     BasicConv2d(c7, 192, (1, 7)))
        self.branch_pool = _avg_pool_branch(in_channels, 192)
        self.out_channels = _width(self.branch0, self.branch1, self.branch2, self.branch_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch_pool(x)), dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (stride 2, unpadded)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(in_channels, 192, 1),
                                     BasicConv2d(192, 320, 3, stride=2, pad_mode="valid"))
        self.branch1 = nn.Sequential(BasicConv2d(in_channels, 192, 1), BasicConv2d(192, 192, (1, 7)),
                                     BasicConv2d(192, 192, (7, 1)),
                                     BasicConv2d(192, 192, 3, stride=2, pad_mode="valid"))
        self.branch_pool = MaxPool2d(3, 2)
        self.out_channels = _width(self.branch0, self.branch1) + in_channels  # + the max pool branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch_pool(x)), dim=1)


class InceptionE(nn.Module):
    """Expanded filter bank: the 3x3 branches split into parallel 1x3 and 3x1 convs."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch0 = BasicConv2d(in_channels, 320, 1)
        self.branch1 = BasicConv2d(in_channels, 384, 1)
        self.branch1a = BasicConv2d(384, 384, (1, 3))
        self.branch1b = BasicConv2d(384, 384, (3, 1))
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, 448, 1), BasicConv2d(448, 384, 3))
        self.branch2a = BasicConv2d(384, 384, (1, 3))
        self.branch2b = BasicConv2d(384, 384, (3, 1))
        self.branch_pool = _avg_pool_branch(in_channels, 192)
        self.out_channels = _width(self.branch0, self.branch1a, self.branch1b, self.branch2a, self.branch2b,
                                   self.branch_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch1(x)
        x2 = self.branch2(x)
        return torch.cat((self.branch0(x), self.branch1a(x1), self.branch1b(x1), self.branch2a(x2),
                          self.branch2b(x2), self.branch_pool(x)), dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 map (299 px images): pool 5/3, 1x1, 5x5 to 768, linear."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.avg_pool = AvgPool2d(5, 3)
        self.conv0 = BasicConv2d(in_channels, 128, 1)
        self.conv1 = BasicConv2d(128, 768, 5, pad_mode="valid")
        self.flatten = nn.Flatten()
        # MindCV sizes the linear layer by in_channels (768), which equals conv1's width.
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.conv1(self.conv0(self.avg_pool(x)))))


class InceptionV3(nn.Module):
    """Inception v3 classifier; ``feature_info``: ``conv2b``, ``conv4a``, ``inception5d``,
    ``inception6e``, ``inception7c``.

    Args:
        num_classes, in_channels: classifier outputs, input channels.
        aux_logits: build the auxiliary classifier; in training mode the forward
            then returns ``(logits, aux_logits)``.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, in_channels: int = 3,
                 drop_rate: float = 0.2):
        super().__init__()
        self.aux_logits = aux_logits
        # The body in forward order, one list per stride (each starts with its one stride-2 layer); the last
        # module of each list is that stride's feature.
        stages = (
            (("conv1a", BasicConv2d(in_channels, 32, 3, stride=2, pad_mode="valid")),
             ("conv2a", BasicConv2d(32, 32, 3, pad_mode="valid")),
             ("conv2b", BasicConv2d(32, 64, 3))),
            (("maxpool1", MaxPool2d(3, 2)),
             ("conv3b", BasicConv2d(64, 80, 1)),
             ("conv4a", BasicConv2d(80, 192, 3, pad_mode="valid"))),
            (("maxpool2", MaxPool2d(3, 2)),
             ("inception5b", InceptionA(192, pool_features=32)),
             ("inception5c", InceptionA(256, pool_features=64)),
             ("inception5d", InceptionA(288, pool_features=64))),
            (("inception6a", InceptionB(288)),
             ("inception6b", InceptionC(768, channels_7x7=128)),
             ("inception6c", InceptionC(768, channels_7x7=160)),
             ("inception6d", InceptionC(768, channels_7x7=160)),
             ("inception6e", InceptionC(768, channels_7x7=192))),
            (("inception7a", InceptionD(768)),
             ("inception7b", InceptionE(1280)),
             ("inception7c", InceptionE(2048))),
        )
        self.feature_info: List[dict] = []
        self.layer_names: List[str] = []
        reduction = 1
        for stage in stages:
            reduction *= 2
            for name, layer in stage:
                self.add_module(name, layer)
                self.layer_names.append(name)
            name, last = stage[-1]
            self.feature_info.append(dict(chs=last.out_channels, reduction=reduction, name=name))
            if aux_logits and name == "inception6e":
                # MindCV registers the auxiliary head here, on the layer it reads.
                self.aux = InceptionAux(last.out_channels, num_classes)
                self._aux_index = len(self.feature_info) - 1
        chs = self.feature_info[-1]["chs"]

        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=drop_rate)
        self.num_features = chs
        self.classifier = nn.Linear(chs, num_classes)
        init_weights(self, conv=xavier_uniform)

    # -- forward ------------------------------------------------------------------------
    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        wanted = {self.feature_info[i]["name"] for i in take}
        out: List[torch.Tensor] = []
        for name in self.layer_names:
            x = getattr(self, name)(x)
            if name in wanted:
                out.append(x)
                if len(out) == len(wanted):
                    break
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the heads (classifier and auxiliary) and every layer after the deepest feature."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("aux", "pool", "dropout", "classifier"):
            if hasattr(self, name):
                delattr(self, name)
        last = self.layer_names.index(self.feature_info[deepest]["name"])
        for name in self.layer_names[last + 1:]:
            delattr(self, name)
        self.layer_names = self.layer_names[:last + 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if not (self.training and self.aux_logits):
            return self.forward_head(self.forward_features(x))
        # The auxiliary head reads the stride-16 feature: one pass gives it and the final map.
        x16, x = self.forward_levels(x, [self._aux_index, len(self.feature_info) - 1])
        return self.forward_head(x), self.aux(x16)


def _create_inception_v3(variant: str, pretrained: bool = False, **kwargs) -> InceptionV3:
    return build_model_with_cfg(InceptionV3, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    # MindCV's first_conv "conv1a" is the conv + BN block; the conv is "conv1a.conv". Its classifier is
    # "classifier"; the auxiliary head is a head too (dropped by feature models, sized by num_classes).
    return dict(url=url, num_classes=1000, first_conv="conv1a.conv", classifier="classifier,aux",
                min_input_size=(3, 75, 75), size_note="unpadded stride-2 layers: 64 px shrinks to 0x0",
                valid_padding="unpadded stride-2 convolutions and pools", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "inception_v3": _cfg(f"{_MS}/inception_v3/inception_v3-38f67890.ckpt"),
})


# No timm twin: timm's inception_v3 has our tensors only when built with aux_logits=True (by default its
# state dict lacks our ``aux`` head), and it computes something else at every size: its branch average
# pools count the zero padding (F.avg_pool2d's default), MindCV's "same" pools do not.


@register_model
def inception_v3(pretrained: bool = False, **kwargs) -> InceptionV3:
    return _create_inception_v3("inception_v3", pretrained, **{"aux_logits": True, **kwargs})
