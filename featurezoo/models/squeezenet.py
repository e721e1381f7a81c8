"""SqueezeNet 1.0 and 1.1, with MindCV's module tree and parameter names.

`SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size
<https://arxiv.org/abs/1602.07360>`_. ``features`` is one sequence of the stem
conv, its ReLU, max pools and ``Fire`` modules; the classifier is dropout, a 1x1
conv to the classes (``final_conv``), ReLU and global pooling.

MindCV's stem conv (1.0: 7x7 ``valid``) and max pools (3x3 stride 2 ``valid``,
i.e. floor mode, where torchvision uses ceil mode) do not pad, so a map is
smaller than ``ceil(size / reduction)``: at 64 px, 1.0 gives 29, 14, 6, 2 and
1.1 gives 32, 15, 7, 3 pixels at reductions 2, 4, 8, 16. ``feature_info``
records the nominal reductions (the product of the strides), the last layer at
each: the stem ReLU and the last ``Fire`` before each pool.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling, MaxPool2d
from ..layers.feature_levels import note_feature
from ..layers.init import he_uniform, init_weights, normal
from ..registry import register_model

__all__ = ["SqueezeNet", "Fire"]

# Layer lists after the stem: "M" a 3x3 stride-2 max pool, a tuple a Fire (in, squeeze, expand1x1, expand3x3).
_V1_0 = ("M", (96, 16, 64, 64), (128, 16, 64, 64), (128, 32, 128, 128), "M", (256, 32, 128, 128),
         (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256), "M", (512, 64, 256, 256))
_V1_1 = ("M", (64, 16, 64, 64), (128, 16, 64, 64), "M", (128, 32, 128, 128), (256, 32, 128, 128), "M",
         (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256), (512, 64, 256, 256))


class Fire(nn.Module):
    """1x1 squeeze conv + ReLU, then 1x1 and 3x3 expand convs (+ ReLU) concatenated."""

    def __init__(self, in_channels: int, squeeze_channels: int, expand1x1_channels: int, expand3x3_channels: int):
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze_channels, 1, bias=True)
        self.squeeze_activation = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze_channels, expand1x1_channels, 1, bias=True)
        self.expand1x1_activation = nn.ReLU()
        self.expand3x3 = nn.Conv2d(squeeze_channels, expand3x3_channels, 3, padding=1, bias=True)
        self.expand3x3_activation = nn.ReLU()
        self.out_channels = expand1x1_channels + expand3x3_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat((self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))), dim=1)


class SqueezeNet(nn.Module):
    """SqueezeNet classifier; ``feature_info``: the stem ReLU and the last ``Fire`` at each reduction.

    Args:
        version: ``"1_0"`` or ``"1_1"``.
        num_classes, in_channels: classifier outputs, input channels.
        drop_rate: dropout before the classifier conv.
    """

    def __init__(self, version: str = "1_0", num_classes: int = 1000, drop_rate: float = 0.5, in_channels: int = 3):
        super().__init__()
        if version == "1_0":
            stem_chs, layer_list = 96, _V1_0
            stem = nn.Conv2d(in_channels, stem_chs, 7, 2, padding=0, bias=True)
        elif version == "1_1":
            stem_chs, layer_list = 64, _V1_1
            stem = nn.Conv2d(in_channels, stem_chs, 3, 2, padding=1, bias=True)
        else:
            raise ValueError(f"Unsupported SqueezeNet version {version!r}: '1_0' or '1_1' expected")

        layers: List[nn.Module] = [stem, nn.ReLU()]
        reduction, chs = 2, stem_chs
        self.feature_info: List[Dict] = []
        note_feature(self.feature_info, chs, reduction, f"features.{len(layers) - 1}")
        for spec in layer_list:
            if spec == "M":
                layers.append(MaxPool2d(kernel_size=3, stride=2, pad_mode="valid"))
                reduction *= 2
                continue
            fire = Fire(*spec)
            layers.append(fire)
            chs = fire.out_channels
            note_feature(self.feature_info, chs, reduction, f"features.{len(layers) - 1}")
        self.features = nn.Sequential(*layers)

        self.num_features = chs
        # MindCV also holds the 1x1 conv as ``final_conv``; its parameters are named
        # ``classifier.1.*`` only, so here it is a property, not a second module entry.
        self.classifier = nn.Sequential(
            nn.Dropout(p=drop_rate),
            nn.Conv2d(chs, num_classes, 1, bias=True),
            nn.ReLU(),
            GlobalAvgPooling(),
        )
        init_weights(self, conv=he_uniform, special={self.final_conv: normal(0.01)})

    @property
    def final_conv(self) -> nn.Conv2d:
        return self.classifier[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_squeezenet(variant: str, pretrained: bool = False, **kwargs) -> SqueezeNet:
    return build_model_with_cfg(SqueezeNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.0", classifier="classifier.1", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/squeezenet"
default_cfgs = generate_default_cfgs({
    "squeezenet1_0": _cfg(f"{_MS}/squeezenet1_0-e2d78c4a.ckpt",
                          valid_padding="unpadded 7x7 stride-2 stem and valid (floor) 3x3 max pools"),
    "squeezenet1_1": _cfg(f"{_MS}/squeezenet1_1-da256d3a.ckpt", valid_padding="valid (floor) 3x3 max pools"),
})


@register_model
def squeezenet1_0(pretrained: bool = False, **kwargs) -> SqueezeNet:
    return _create_squeezenet("squeezenet1_0", pretrained, version="1_0", **kwargs)


@register_model
def squeezenet1_1(pretrained: bool = False, **kwargs) -> SqueezeNet:
    return _create_squeezenet("squeezenet1_1", pretrained, version="1_1", **kwargs)
