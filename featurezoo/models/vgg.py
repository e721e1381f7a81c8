"""VGG 11/13/16/19, with MindCV's module tree and parameter names.

`Very Deep Convolutional Networks for Large-Scale Image Recognition
<https://arxiv.org/abs/1409.1556>`_. ``features`` is one sequence of 3x3 convs
(padding 1 and, as MindSpore's ``nn.Conv2d`` default, no bias), ReLUs and 2x2
stride-2 max pools; the classifier flattens a 7x7 map, so a full model needs
224 px inputs, while a feature model takes any size.

``feature_info`` (the guide's scenario 2, a chain of modules): the last ReLU
before each pool (strides 1, 2, 4, 8, 16) and the last pool (stride 32), the
layers timm's VGG taps. The pools are MindSpore's ``valid`` pooling: at odd
sizes they round down (67 px: 33, 16, 8, 4, 2), unlike ``ceil(size / reduction)``.
"""
from __future__ import annotations

from typing import Dict, List, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.init import fan_out_normal, init_weights, normal
from ..registry import register_model

__all__ = ["VGG"]

# Output channels of each 3x3 conv; "M" is a 2x2 stride-2 max pool.
CFGS: Dict[str, List[Union[str, int]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG classifier; ``feature_info``: the ReLU before each pool, and the last pool.

    Args:
        model_name: ``vgg11``, ``vgg13``, ``vgg16`` or ``vgg19`` (a key of ``CFGS``).
        batch_norm: a BatchNorm after each conv (MindCV's option; its registered models have none).
        num_classes, in_channels: classifier outputs, input channels.
        drop_rate: dropout of the classifier's hidden layers.
    """

    def __init__(self, model_name: str, batch_norm: bool = False, num_classes: int = 1000, in_channels: int = 3,
                 drop_rate: float = 0.5):
        super().__init__()
        if model_name not in CFGS:
            raise ValueError(f"unknown VGG configuration {model_name!r}; valid: {sorted(CFGS)}")
        self.feature_info = []
        layers: List[nn.Module] = []
        chs, reduction = in_channels, 1
        for v in CFGS[model_name]:
            if v == "M":
                # The module before the pool ends this resolution.
                self.feature_info.append(dict(chs=chs, reduction=reduction, name=f"features.{len(layers) - 1}"))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
            else:
                layers.append(nn.Conv2d(chs, v, 3, padding=1, bias=False))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU())
                chs = v
        self.feature_info.append(dict(chs=chs, reduction=reduction, name=f"features.{len(layers) - 1}"))
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.num_features = chs * 7 * 7
        self.classifier = nn.Sequential(
            nn.Linear(self.num_features, 4096),
            nn.ReLU(),
            nn.Dropout(drop_rate),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(drop_rate),
            nn.Linear(4096, num_classes),
        )
        init_weights(self, conv=fan_out_normal, linear=normal(0.01))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vgg(variant: str, pretrained: bool = False, **kwargs) -> VGG:
    return build_model_with_cfg(VGG, pretrained, default_cfg=default_cfgs[variant], model_name=variant, **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.0", classifier="classifier.6",
                fixed_input_size=True, size_note="the classifier flattens a 7x7 map: 224..255 px only",
                valid_padding="valid (floor) 2x2 max pools", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/vgg"
default_cfgs = generate_default_cfgs({
    "vgg11": _cfg(f"{_MS}/vgg11-ef31d161.ckpt"),
    "vgg13": _cfg(f"{_MS}/vgg13-da805e6e.ckpt"),
    "vgg16": _cfg(f"{_MS}/vgg16-95697531.ckpt"),
    "vgg19": _cfg(f"{_MS}/vgg19-bedee7b6.ckpt"),
})


# No timm twin: timm's vgg11/13/16/19 give every conv a bias (MindSpore's nn.Conv2d has none here) and hold
# the first two classifier layers as 7x7 and 1x1 convs (ours nn.Linear): timm's conv biases have no place here.


@register_model
def vgg11(pretrained: bool = False, **kwargs) -> VGG:
    return _create_vgg("vgg11", pretrained, **kwargs)


@register_model
def vgg13(pretrained: bool = False, **kwargs) -> VGG:
    return _create_vgg("vgg13", pretrained, **kwargs)


@register_model
def vgg16(pretrained: bool = False, **kwargs) -> VGG:
    return _create_vgg("vgg16", pretrained, **kwargs)


@register_model
def vgg19(pretrained: bool = False, **kwargs) -> VGG:
    return _create_vgg("vgg19", pretrained, **kwargs)
