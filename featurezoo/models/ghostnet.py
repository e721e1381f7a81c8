"""GhostNet, with MindCV's module tree and parameter names.

`GhostNet: More Features from Cheap Operations <https://arxiv.org/abs/1911.11907>`_.
A ghost module makes half its channels with a 1x1 conv and the rest with a
cheap depthwise conv of those. ``blocks`` holds one ``nn.Sequential`` per row
group of the setting and, last, a 1x1 ``ConvBnAct`` (MindCV's
``forward_features`` ends there); the head pools first and then applies its
1x1 ``conv_head``. Every conv pads symmetrically except ``ConvBnAct``'s 1x1
``same`` conv, which needs none.

MindCV has no ``feature_info`` here; ours is the last layer at each reduction:
the stem's ReLU is superseded by ``blocks.0`` (stride 1), then ``blocks.2``,
``blocks.4``, ``blocks.6`` and the ``ConvBnAct`` ``blocks.9``.

``output_stride=16`` (or 8) turns the strides that would pass it into dilation
(timm's GhostNet has no such option; this follows its EfficientNet-builder rule,
and dilates every spatial conv after a removed stride, as an a-trous network
does): a block that loses its stride keeps its layers, at stride 1, with the
dilation before it up to and including its depthwise conv and the new dilation
in its second ghost module; the blocks after take the new dilation. The entries
stay those of the model at stride 32, with the real reductions.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.feature_levels import note_feature
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import he_uniform, init_weights
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["GhostNet", "GhostBottleneck", "GhostModule"]

# One tuple of blocks per stage of ``blocks``: kernel k, expansion channels t, output channels c,
# SE ratio (0: none), stride s.
_CFGS = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    ((3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)),
)


class HardSigmoid(nn.Module):
    """``relu6(x + 3) / 6``, as MindCV's GhostNet cell (with its ``relu6`` child)."""

    def __init__(self):
        super().__init__()
        self.relu6 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu6(x + 3.0) / 6.0


class ConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1,
                 act_layer: type = nn.ReLU):
        super().__init__()
        if kernel_size != 1 or stride != 1:
            # MindCV pads "same"; only the 1x1 stride-1 case, the one GhostNet uses, is padding-free.
            raise ValueError(f"ConvBnAct supports only 1x1 stride-1 convs, got {kernel_size}x{kernel_size} "
                             f"stride {stride}")
        self.features = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs),
                                      act_layer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class GhostModule(nn.Module):
    """``oup`` channels: ``ceil(oup / ratio)`` from a conv, the rest from a depthwise conv (dilated by
    ``dilation``) of those."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, relu: bool = True, dilation: int = 1):
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        # MindCV uses an empty SequentialCell where there is no ReLU: the identity, kept for the tree.
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU() if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, padding=dilation * (dw_size // 2), dilation=dilation,
                      groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            nn.ReLU() if relu else nn.Sequential(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat((x1, x2), dim=1)[:, :self.oup]


class GhostBottleneck(nn.Module):
    """Ghost module, (strided depthwise conv), (SE), linear ghost module, plus a shortcut.

    ``dilation``: before and after the block's stride; they differ where the stride became
    dilation (``stride`` 1), and the block keeps its downsampling layers then."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, dilation: Tuple[int, int] = (1, 1)):
        super().__init__()
        self.stride = stride
        self.downsamples = stride > 1 or dilation[0] != dilation[1]
        dw_padding = dilation[0] * (dw_kernel_size - 1) // 2
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True, dilation=dilation[0])
        if self.downsamples:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, padding=dw_padding,
                                     dilation=dilation[0], groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se: Optional[SqueezeExcite] = None
        if se_ratio is not None and se_ratio > 0.0:
            self.se = SqueezeExcite(mid_chs, rd_ratio=se_ratio, rd_divisor=4, gate_layer=HardSigmoid)
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False, dilation=dilation[1])
        if in_chs == out_chs and not self.downsamples:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, padding=dw_padding, dilation=dilation[0],
                          groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.downsamples:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        return self.ghost2(out) + self.shortcut(x)


class GhostNet(nn.Module):
    """GhostNet classifier; ``feature_info``: the last stage at each reduction (``blocks.*``).

    Args:
        num_classes, in_channels: classifier outputs, input channels.
        width: width multiplier (channels rounded to multiples of 4).
        drop_rate: dropout before the classifier (no ``dropout`` module when 0).
        output_stride: 32, or 16 / 8 to dilate the blocks past that stride instead of striding.
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, drop_rate: float = 0.2,
                 output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"GhostNet: output_stride must be 8, 16 or 32, got {output_stride!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_channels, stem_chs, 3, 2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU()
        # ``nominal``: the reduction at output_stride 32, which chooses the entries and numbers their stages.
        nominal = reduction = total_stride(self.conv_stem)
        dilation = 1
        self.feature_info: List[Dict] = []
        note_feature(self.feature_info, stem_chs, nominal, "act1")

        prev_chs = stem_chs
        stages: List[nn.Module] = []
        for cfg in _CFGS:
            layers: List[nn.Module] = []
            for k, exp_size, c, se_ratio, s in cfg:
                out_chs = make_divisible(c * width, 4)
                mid_chs = make_divisible(exp_size * width, 4)
                stride, block_dilation = s, dilation
                if reduction * s > output_stride:
                    stride, dilation = 1, dilation * s
                layers.append(GhostBottleneck(prev_chs, mid_chs, out_chs, k, stride, se_ratio=se_ratio,
                                              dilation=(block_dilation, dilation)))
                prev_chs = out_chs
                reduction, nominal = reduction * stride, nominal * s
            stages.append(nn.Sequential(*layers))
            note_feature(self.feature_info, prev_chs, nominal, f"blocks.{len(stages) - 1}")
        out_chs = make_divisible(exp_size * width, 4)
        stages.append(ConvBnAct(prev_chs, out_chs, 1))
        note_feature(self.feature_info, out_chs, nominal, f"blocks.{len(stages) - 1}")
        for entry in self.feature_info:  # the stage of each entry past the stem, then its real reduction
            if entry["reduction"] >= 4:
                entry["stage"] = entry["reduction"].bit_length() - 2
            entry["reduction"] = min(entry["reduction"], output_stride)
        prev_chs = out_chs
        self.blocks = nn.Sequential(*stages)

        self.num_features = 1280
        self.global_pool = GlobalAvgPooling(keep_dims=True)
        self.conv_head = nn.Conv2d(prev_chs, self.num_features, 1, bias=True)
        self.act2 = nn.ReLU()
        self.flatten = nn.Flatten()
        if drop_rate > 0.0:
            self.dropout = nn.Dropout(p=drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=he_uniform, linear=he_uniform)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.act2(self.conv_head(self.global_pool(x))))
        if self.drop_rate > 0.0:
            x = self.dropout(x)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_ghostnet(variant: str, pretrained: bool = False, **kwargs) -> GhostNet:
    return build_model_with_cfg(GhostNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    # The head conv comes after the pooling: a feature model drops both it and the classifier.
    return dict(url=url, num_classes=1000, first_conv="conv_stem", classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/ghostnet"
# timm's GhostNet has this tree and these names, but for the last stage's ConvBnAct (``blocks.9.0.conv``,
# ``blocks.9.0.bn1``); it pads the same way, so with its weights the outputs are timm's.
_TIMM_TWINS = {n: n for n in ("ghostnet_050", "ghostnet_100", "ghostnet_130")}

_TIMM_RENAMES = ((r"^blocks\.9\.0\.conv\.", "blocks.9.features.0."), (r"^blocks\.9\.0\.bn1\.", "blocks.9.features.1."))


default_cfgs = generate_default_cfgs({
    "ghostnet_050": _cfg(f"{_MS}/ghostnet_050-85b91860.ckpt"),
    "ghostnet_100": _cfg(f"{_MS}/ghostnet_100-bef8025a.ckpt"),
    "ghostnet_130": _cfg(f"{_MS}/ghostnet_130-cf4c235c.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def ghostnet_050(pretrained: bool = False, **kwargs) -> GhostNet:
    return _create_ghostnet("ghostnet_050", pretrained, width=0.5, **kwargs)


@register_model
def ghostnet_100(pretrained: bool = False, **kwargs) -> GhostNet:
    return _create_ghostnet("ghostnet_100", pretrained, width=1.0, **kwargs)


@register_model
def ghostnet_130(pretrained: bool = False, **kwargs) -> GhostNet:
    return _create_ghostnet("ghostnet_130", pretrained, width=1.3, **kwargs)
