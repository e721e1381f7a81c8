"""Inception v4, with MindCV's module tree and parameter names.

`Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning
<https://arxiv.org/abs/1602.07261>`_.

``features`` holds the :class:`Stem` (strides 2 to 8, three two-branch
"mixed" reductions), 4 :class:`InceptionA`, :class:`ReductionA`, 7
:class:`InceptionB`, :class:`ReductionB` and 3 :class:`InceptionC`. As in
MindCV every stride-2 layer is unpadded (``valid``), so maps are smaller than
``size / reduction`` (299 px: 149, 73, 35, 17, 8) and the model needs at least
75 px.

``feature_info``: inside the stem, ``conv2d_2b_3x3`` (stride 2) and the end of
the stride-4 part, ``mixed_4a`` (the concatenation of its two branches; named
by its last branch, ``features.0.mixed_4a_branch_1``); then the last block at
strides 8, 16 and 32. :meth:`InceptionV4.forward_levels` is the
classifier's own forward, stopping after the deepest requested feature.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..cfg import IndexMap
from ..features import take_levels
from ..layers import AvgPool2d, GlobalAvgPooling, MaxPool2d
from ..layers.conv_norm_act import BasicConv2d
from ..layers.init import init_weights, xavier_uniform
from ..registry import register_model

__all__ = ["InceptionV4", "Stem"]


def _out(branch: nn.Module) -> int:
    return (branch[-1] if isinstance(branch, nn.Sequential) else branch).out_channels


class Stem(nn.Module):
    """299 -> 35: three convs, then three reductions that concatenate a conv branch and a pool/conv branch.

    The forward runs in three parts so that a feature model can stop inside
    the stem: :meth:`forward_stride2`, :meth:`forward_stride4`,
    :meth:`forward_stride8`, each starting with one stride-2 layer.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv2d_1a_3x3 = BasicConv2d(in_channels, 32, 3, stride=2, pad_mode="valid")
        self.conv2d_2a_3x3 = BasicConv2d(32, 32, 3, pad_mode="valid")
        self.conv2d_2b_3x3 = BasicConv2d(32, 64, 3, pad_mode="pad", padding=1)

        self.mixed_3a_branch_0 = MaxPool2d(3, 2)
        self.mixed_3a_branch_1 = BasicConv2d(64, 96, 3, stride=2, pad_mode="valid")
        mixed_3a = 64 + self.mixed_3a_branch_1.out_channels  # max pool keeps conv2d_2b_3x3's 64

        self.mixed_4a_branch_0 = nn.Sequential(BasicConv2d(mixed_3a, 64, 1), BasicConv2d(64, 96, 3, pad_mode="valid"))
        self.mixed_4a_branch_1 = nn.Sequential(
            BasicConv2d(mixed_3a, 64, 1), BasicConv2d(64, 64, (1, 7)), BasicConv2d(64, 64, (7, 1)),
            BasicConv2d(64, 96, 3, pad_mode="valid"),
        )
        mixed_4a = _out(self.mixed_4a_branch_0) + _out(self.mixed_4a_branch_1)

        self.mixed_5a_branch_0 = BasicConv2d(mixed_4a, 192, 3, stride=2, pad_mode="valid")
        self.mixed_5a_branch_1 = MaxPool2d(3, 2)
        # Channels of the three parts' outputs (strides 2, 4, 8).
        self.widths = (self.conv2d_2b_3x3.out_channels, mixed_4a, self.mixed_5a_branch_0.out_channels + mixed_4a)

    def forward_stride2(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d_2b_3x3(self.conv2d_2a_3x3(self.conv2d_1a_3x3(x)))

    def forward_stride4(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.mixed_3a_branch_0(x), self.mixed_3a_branch_1(x)), dim=1)
        return torch.cat((self.mixed_4a_branch_0(x), self.mixed_4a_branch_1(x)), dim=1)

    def forward_stride8(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.mixed_5a_branch_0(x), self.mixed_5a_branch_1(x)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stride8(self.forward_stride4(self.forward_stride2(x)))


def _avg_pool_branch(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(AvgPool2d(3, 1, pad_mode="same"), BasicConv2d(in_channels, out_channels, 1))


class InceptionA(nn.Module):
    def __init__(self, in_channels: int = 384):
        super().__init__()
        self.branch_0 = BasicConv2d(in_channels, 96, 1)
        self.branch_1 = nn.Sequential(BasicConv2d(in_channels, 64, 1),
                                      BasicConv2d(64, 96, 3, pad_mode="pad", padding=1))
        self.branch_2 = nn.Sequential(
            BasicConv2d(in_channels, 64, 1), BasicConv2d(64, 96, 3, pad_mode="pad", padding=1),
            BasicConv2d(96, 96, 3, pad_mode="pad", padding=1),
        )
        self.branch_3 = _avg_pool_branch(in_channels, 96)
        self.out_channels = sum(_out(b) for b in (self.branch_0, self.branch_1, self.branch_2, self.branch_3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)), dim=1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int = 1024):
        super().__init__()
        self.branch_0 = BasicConv2d(in_channels, 384, 1)
        self.branch_1 = nn.Sequential(
            BasicConv2d(in_channels, 192, 1), BasicConv2d(192, 224, (1, 7)), BasicConv2d(224, 256, (7, 1)),
        )
        self.branch_2 = nn.Sequential(
            BasicConv2d(in_channels, 192, 1), BasicConv2d(192, 192, (7, 1)), BasicConv2d(192, 224, (1, 7)),
            BasicConv2d(224, 224, (7, 1)), BasicConv2d(224, 256, (1, 7)),
        )
        self.branch_3 = _avg_pool_branch(in_channels, 128)
        self.out_channels = sum(_out(b) for b in (self.branch_0, self.branch_1, self.branch_2, self.branch_3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)), dim=1)


class ReductionA(nn.Module):
    """35 -> 17 (stride 2, unpadded)."""

    def __init__(self, in_channels: int = 384):
        super().__init__()
        self.branch_0 = BasicConv2d(in_channels, 384, 3, stride=2, pad_mode="valid")
        self.branch_1 = nn.Sequential(
            BasicConv2d(in_channels, 192, 1), BasicConv2d(192, 224, 3, pad_mode="pad", padding=1),
            BasicConv2d(224, 256, 3, stride=2, pad_mode="valid"),
        )
        self.branch_2 = MaxPool2d(3, 2)
        self.out_channels = _out(self.branch_0) + _out(self.branch_1) + in_channels  # + the max pool branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch_0(x), self.branch_1(x), self.branch_2(x)), dim=1)


class ReductionB(nn.Module):
    """17 -> 8 (stride 2, unpadded)."""

    def __init__(self, in_channels: int = 1024):
        super().__init__()
        self.branch_0 = nn.Sequential(BasicConv2d(in_channels, 192, 1),
                                      BasicConv2d(192, 192, 3, stride=2, pad_mode="valid"))
        self.branch_1 = nn.Sequential(
            BasicConv2d(in_channels, 256, 1), BasicConv2d(256, 256, (1, 7)), BasicConv2d(256, 320, (7, 1)),
            BasicConv2d(320, 320, 3, stride=2, pad_mode="valid"),
        )
        self.branch_2 = MaxPool2d(3, 2)
        self.out_channels = _out(self.branch_0) + _out(self.branch_1) + in_channels  # + the max pool branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch_0(x), self.branch_1(x), self.branch_2(x)), dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int = 1536):
        super().__init__()
        self.branch_0 = BasicConv2d(in_channels, 256, 1)
        self.branch_1 = BasicConv2d(in_channels, 384, 1)
        self.branch_1_1 = BasicConv2d(384, 256, (1, 3))
        self.branch_1_2 = BasicConv2d(384, 256, (3, 1))
        self.branch_2 = nn.Sequential(
            BasicConv2d(in_channels, 384, 1), BasicConv2d(384, 448, (3, 1)), BasicConv2d(448, 512, (1, 3)),
        )
        self.branch_2_1 = BasicConv2d(512, 256, (1, 3))
        self.branch_2_2 = BasicConv2d(512, 256, (3, 1))
        self.branch_3 = _avg_pool_branch(in_channels, 256)
        self.out_channels = sum(_out(b) for b in (self.branch_0, self.branch_1_1, self.branch_1_2, self.branch_2_1,
                                                  self.branch_2_2, self.branch_3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch_1(x)
        x2 = self.branch_2(x)
        return torch.cat((self.branch_0(x), self.branch_1_1(x1), self.branch_1_2(x1), self.branch_2_1(x2),
                          self.branch_2_2(x2), self.branch_3(x)), dim=1)


class InceptionV4(nn.Module):
    """Inception v4 classifier; ``feature_info``: ``features.0.conv2d_2b_3x3``,
    ``features.0.mixed_4a_branch_1`` (the stem's stride-4 output), ``features.4``, ``features.12``,
    ``features.16``.

    Args:
        num_classes, in_channels: classifier outputs, input channels.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, drop_rate: float = 0.2):
        super().__init__()
        stem = Stem(in_channels)
        blocks: List[nn.Module] = [stem]
        # The stem's stride-2 and stride-4 parts end inside it; its stride-8 part feeds the blocks.
        self.feature_info = [dict(chs=stem.widths[i], reduction=2 ** (i + 1), name=name) for i, name in
                             enumerate(("features.0.conv2d_2b_3x3", "features.0.mixed_4a_branch_1"))]
        chs, reduction = stem.widths[2], 8
        # Feature index of the block at each position of ``features`` that ends a stride.
        self._feature_at: Dict[int, int] = {}
        for block, repeats in ((InceptionA, 4), (ReductionA, 1), (InceptionB, 7), (ReductionB, 1), (InceptionC, 3)):
            if block in (ReductionA, ReductionB):  # stride 2: the previous block ends its stride
                self._feature_at[len(blocks) - 1] = len(self.feature_info)
                self.feature_info.append(dict(chs=chs, reduction=reduction, name=f"features.{len(blocks) - 1}"))
                reduction *= 2
            for _ in range(repeats):
                blocks.append(block(chs))
                chs = blocks[-1].out_channels
        self._feature_at[len(blocks) - 1] = len(self.feature_info)
        self.feature_info.append(dict(chs=chs, reduction=reduction, name=f"features.{len(blocks) - 1}"))
        self.features = nn.Sequential(*blocks)

        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=drop_rate)
        self.num_features = chs
        self.classifier = nn.Linear(chs, num_classes)
        init_weights(self, conv=xavier_uniform)

    # -- forward ------------------------------------------------------------------------
    def _steps(self) -> Iterator[Tuple[Callable[[torch.Tensor], torch.Tensor], Optional[int]]]:
        """The forward as (step, feature index or None), the stem in its three parts."""
        stem = self.features[0]
        yield stem.forward_stride2, 0
        yield stem.forward_stride4, 1
        yield stem.forward_stride8, None
        for position, block in enumerate(self.features):
            if position > 0:
                yield block, self._feature_at.get(position)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        for step, index in self._steps():
            x = step(x)
            if index in take:
                out.append(x)
                if index == deepest:
                    break
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every module after the deepest feature in ``indices`` (inside the stem too)."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("pool", "dropout", "classifier"):
            delattr(self, name)
        last = next((p for p, i in self._feature_at.items() if i == deepest), 0)  # 0: inside the stem
        for name in list(self.features._modules)[last + 1:]:
            delattr(self.features, name)
        if deepest < 2:
            stem = self.features[0]
            unused = ["mixed_5a_branch_0", "mixed_5a_branch_1"]
            if deepest == 0:
                unused += ["mixed_3a_branch_0", "mixed_3a_branch_1", "mixed_4a_branch_0", "mixed_4a_branch_1"]
            for name in unused:
                delattr(stem, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_inception_v4(variant: str, pretrained: bool = False, **kwargs) -> InceptionV4:
    return build_model_with_cfg(InceptionV4, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.0.conv2d_1a_3x3.conv", classifier="classifier",
                min_input_size=(3, 75, 75), size_note="unpadded stride-2 layers: 64 px shrinks to 0x0",
                valid_padding="unpadded stride-2 convolutions and pools", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm's inception_v4 has the same architecture and parameters, and computes what MindCV does at any size:
# BN eps 1e-3, unpadded stride-2 layers, symmetric 'same' convs, branch average pools that ignore padding.
# Its features.0-5 are our stem, features.0 here; its blocks features.6-21 are our features.1-16.
_TIMM_TWINS = {"inception_v4": "inception_v4"}

_TIMM_RENAMES = (
    (r"^features\.0\.", "features.0.conv2d_1a_3x3."), (r"^features\.1\.", "features.0.conv2d_2a_3x3."),
    (r"^features\.2\.", "features.0.conv2d_2b_3x3."), (r"^features\.3\.conv\.", "features.0.mixed_3a_branch_1."),
    (r"^features\.4\.branch(\d)\.", r"features.0.mixed_4a_branch_\1."),
    (r"^features\.5\.conv\.", "features.0.mixed_5a_branch_0."),
    (r"^features\.(\d+)\.branch", IndexMap("features.{0}.branch", (1, -5))),
    # Inception-C's split branches
    (r"\.branch1_0\.", ".branch_1."), (r"\.branch1_1a\.", ".branch_1_1."), (r"\.branch1_1b\.", ".branch_1_2."),
    (r"\.branch2_([012])\.", r".branch_2.\1."), (r"\.branch2_3a\.", ".branch_2_1."),
    (r"\.branch2_3b\.", ".branch_2_2."),
    (r"\.branch(\d)\.", r".branch_\1."), (r"^last_linear\.", "classifier."),
)


default_cfgs = generate_default_cfgs({
    "inception_v4": _cfg(f"{_MS}/inception_v4/inception_v4-db9c45b3.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def inception_v4(pretrained: bool = False, **kwargs) -> InceptionV4:
    return _create_inception_v4("inception_v4", pretrained, **kwargs)
