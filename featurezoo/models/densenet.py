"""DenseNet-BC, with MindCV's module tree and parameter names.

`Densely Connected Convolutional Networks <https://arxiv.org/abs/1608.06993>`_.

Everything but the head sits in one ``features`` sequence (stem, dense blocks,
transitions, final BN + ReLU); each dense block concatenates its layers'
outputs internally, so the sequence is a plain chain of modules and feature
extraction runs it as such (the guide's scenario 2): nothing after the deepest
requested block is held or computed.

``feature_info``: the stem's ReLU (stride 2), the end of each dense block at
strides 4, 8 and 16 (before its transition halves width and resolution), and
the final ReLU (stride 32), as timm's DenseNet taps.

The transitions' 2x2 average pooling is MindSpore's ``valid`` pooling: at odd
sizes it rounds down (67 px: 17 -> 8), unlike ``ceil(size / reduction)``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..cfg import IndexMap
from ..layers import GlobalAvgPooling
from ..layers.helpers import total_stride
from ..layers.init import fan_out_normal, init_weights, torch_uniform
from ..registry import register_model

__all__ = ["DenseNet"]


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to ``bn_size * growth_rate``), BN-ReLU-3x3 conv (to ``growth_rate``)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)  # each ReLU here acts on a fresh BN output
        self.conv1 = nn.Conv2d(num_input_features, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.dropout = nn.Dropout(p=drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return self.dropout(out) if self.drop_rate > 0.0 else out


class _DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float):
        super().__init__()
        self.cell_list = nn.ModuleList(
            _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            for layer in self.cell_list:
                x = torch.cat((x, layer(x)), dim=1)
            return x
        # Without autograd: one buffer for the block's output, each layer's channels written into it once,
        # instead of concatenating everything before them again at every layer (quadratic copying and memory).
        n, c, h, w = x.shape
        growth = [layer.conv2.out_channels for layer in self.cell_list]
        out = x.new_empty((n, c + sum(growth), h, w))
        out[:, :c] = x
        for layer, g in zip(self.cell_list, growth):
            out[:, c:c + g] = layer(out[:, :c])
            c += g
        return out


class _Transition(nn.Module):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("norm", nn.BatchNorm2d(num_input_features)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(num_input_features, num_output_features, 1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),  # MindSpore "valid": rounds down
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class DenseNet(nn.Module):
    """DenseNet-BC classifier; ``feature_info``: ``features.relu0``, ``features.denseblock1``..``3``,
    ``features.relu5``.

    Args:
        growth_rate: channels each dense layer adds (``k``).
        block_config: dense layers per block.
        num_init_features: width of the stem conv.
        bn_size: bottleneck width factor (``bn_size * k`` channels in each 1x1 conv).
        drop_rate: dropout after each dense layer.
        in_channels, num_classes: input channels, classifier outputs.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0, in_channels: int = 3,
                 num_classes: int = 1000):
        super().__init__()
        num_features = num_init_features
        layers: Dict[str, nn.Module] = OrderedDict()
        layers["conv0"] = nn.Conv2d(in_channels, num_features, 7, stride=2, padding=3, bias=False)
        layers["norm0"] = nn.BatchNorm2d(num_features)
        layers["relu0"] = nn.ReLU(inplace=True)
        reduction = total_stride(layers["conv0"])
        self.feature_info = [dict(chs=num_features, reduction=reduction, name="features.relu0")]
        # MindCV pads with zeros before a "valid" max pool; after a ReLU that equals ignoring the padding.
        layers["pool0"] = nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(kernel_size=3, stride=2))
        reduction *= total_stride(layers["pool0"])

        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            num_features += num_layers * growth_rate
            if i == len(block_config) - 1:
                break
            self.feature_info.append(dict(chs=num_features, reduction=reduction, name=f"features.denseblock{i + 1}"))
            layers[f"transition{i + 1}"] = _Transition(num_features, num_features // 2)
            num_features //= 2
            reduction *= total_stride(layers[f"transition{i + 1}"])

        layers["norm5"] = nn.BatchNorm2d(num_features)
        layers["relu5"] = nn.ReLU(inplace=True)
        self.feature_info.append(dict(chs=num_features, reduction=reduction, name="features.relu5"))

        self.num_features = num_features
        self.features = nn.Sequential(layers)
        self.pool = GlobalAvgPooling()
        self.classifier = nn.Linear(num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=torch_uniform)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_densenet(variant: str, pretrained: bool = False, **kwargs) -> DenseNet:
    return build_model_with_cfg(DenseNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="features.conv0", classifier="classifier",
                valid_padding="2x2 valid average pools in the transitions", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters. Both pad every conv symmetrically, zero-pad the stem
# max pool after a ReLU (timm: pads by one, the same there) and pool the transitions 2x2 unpadded: any size
# computes the same.
_TIMM_TWINS = {n: n for n in ("densenet121", "densenet161", "densenet169", "densenet201")}

_TIMM_RENAMES = (
    (r"\.denselayer(\d+)\.", IndexMap(".cell_list.{0}.", (1, -1))),  # timm counts its layers from 1
    (r"\.(transition\d)\.", r".\1.features."),
)


default_cfgs = generate_default_cfgs({
    "densenet121": _cfg(f"{_MS}/densenet/densenet121-120_5004_Ascend.ckpt"),
    "densenet161": _cfg(f"{_MS}/densenet/densenet161-120_5004_Ascend.ckpt"),
    "densenet169": _cfg(f"{_MS}/densenet/densenet169-120_5004_Ascend.ckpt"),
    "densenet201": _cfg(f"{_MS}/densenet/densenet201-120_5004_Ascend.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def densenet121(pretrained: bool = False, **kwargs) -> DenseNet:
    return _create_densenet("densenet121", pretrained, growth_rate=32, block_config=(6, 12, 24, 16),
                            num_init_features=64, **kwargs)


@register_model
def densenet161(pretrained: bool = False, **kwargs) -> DenseNet:
    return _create_densenet("densenet161", pretrained, growth_rate=48, block_config=(6, 12, 36, 24),
                            num_init_features=96, **kwargs)


@register_model
def densenet169(pretrained: bool = False, **kwargs) -> DenseNet:
    return _create_densenet("densenet169", pretrained, growth_rate=32, block_config=(6, 12, 32, 32),
                            num_init_features=64, **kwargs)


@register_model
def densenet201(pretrained: bool = False, **kwargs) -> DenseNet:
    return _create_densenet("densenet201", pretrained, growth_rate=32, block_config=(6, 12, 48, 32),
                            num_init_features=64, **kwargs)
