"""GoogLeNet (Inception v1), with MindCV's module tree and parameter names.

`Going Deeper with Convolutions <https://arxiv.org/abs/1409.4842>`_. As in
MindCV: convolutions without BatchNorm or bias, MindSpore ``same`` padding
(asymmetric at stride 2), and optional auxiliary classifiers (``aux_logits``,
training only) after ``inception4a`` and ``inception4d``.

The forward is the top-level modules in registration order (the auxiliary
heads are registered after ``inception5b``, as in MindCV), so feature
extraction runs them as a chain (the guide's scenario 1) and drops everything
after the deepest requested feature, auxiliary heads included.

``feature_info``: ``conv1`` (stride 2), ``conv3`` (4), ``inception3b`` (8),
``inception4e`` (16), ``inception5b`` (32): the last module at each stride.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import AvgPool2d, Conv2d, GlobalAvgPooling, MaxPool2d
from ..layers.init import fan_in_normal, init_weights, torch_uniform
from ..registry import register_model

__all__ = ["GoogLeNet", "Inception", "InceptionAux"]


class BasicConv2d(nn.Module):
    """Conv (MindSpore ``same`` padding, no bias) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-5x5; 3x3 max pool-1x1), concatenated."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int):
        super().__init__()
        self.b1 = BasicConv2d(in_channels, ch1x1, 1)
        self.b2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, 1), BasicConv2d(ch3x3red, ch3x3, 3))
        self.b3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, 1), BasicConv2d(ch5x5red, ch5x5, 5))
        self.b4 = nn.Sequential(MaxPool2d(3, 1, pad_mode="same"), BasicConv2d(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.b1(x), self.b2(x), self.b3(x), self.b4(x)), dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (training only); its ``fc1`` expects a 14x14 input (224 px images)."""

    def __init__(self, in_channels: int, num_classes: int, drop_rate: float = 0.7):
        super().__init__()
        self.avg_pool = AvgPool2d(kernel_size=5, stride=3)
        self.conv = BasicConv2d(in_channels, 128, 1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.flatten = nn.Flatten()
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(p=drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.conv(self.avg_pool(x)))
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class GoogLeNet(nn.Module):
    """GoogLeNet classifier; ``feature_info``: ``conv1``, ``conv3``, ``inception3b``, ``inception4e``,
    ``inception5b``.

    Args:
        num_classes, in_channels: classifier outputs, input channels.
        aux_logits: add the auxiliary classifiers; in training mode the forward
            then returns ``(logits, aux2, aux1)`` (MindCV's order).
        drop_rate, drop_rate_aux: dropout before the main and the auxiliary classifiers.
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, in_channels: int = 3,
                 drop_rate: float = 0.2, drop_rate_aux: float = 0.7):
        super().__init__()
        self.aux_logits = aux_logits
        self.conv1 = BasicConv2d(in_channels, 64, 7, stride=2)
        reduction = self.conv1.conv.stride[0]
        self.feature_info = [dict(chs=self.conv1.conv.out_channels, reduction=reduction, name="conv1")]
        self.maxpool1 = MaxPool2d(3, 2, pad_mode="same")
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3)
        reduction *= self.maxpool1.stride[0]
        chs = self.conv3.conv.out_channels
        self.feature_info.append(dict(chs=chs, reduction=reduction, name="conv3"))
        self.maxpool2 = MaxPool2d(3, 2, pad_mode="same")

        # (name, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj); a max pool ends each group but the last.
        groups = (
            (("inception3a", 64, 96, 128, 16, 32, 32), ("inception3b", 128, 128, 192, 32, 96, 64)),
            (("inception4a", 192, 96, 208, 16, 48, 64), ("inception4b", 160, 112, 224, 24, 64, 64),
             ("inception4c", 128, 128, 256, 24, 64, 64), ("inception4d", 112, 144, 288, 32, 64, 64),
             ("inception4e", 256, 160, 320, 32, 128, 128)),
            (("inception5a", 256, 160, 320, 32, 128, 128), ("inception5b", 384, 192, 384, 48, 128, 128)),
        )
        pool = self.maxpool2
        out_chs = {}
        for g, group in enumerate(groups):
            reduction *= pool.stride[0]
            for name, *widths in group:
                block = Inception(chs, *widths)
                self.add_module(name, block)
                out_chs[name] = chs = block.out_channels
            self.feature_info.append(dict(chs=chs, reduction=reduction, name=group[-1][0]))
            if g < len(groups) - 1:
                # MindCV's last pool is 2x2 (the others 3x3), all with "same" padding.
                pool = MaxPool2d(3 if g == 0 else 2, 2, pad_mode="same")
                self.add_module(f"maxpool{g + 3}", pool)

        if aux_logits:
            self.aux1 = InceptionAux(out_chs["inception4a"], num_classes, drop_rate_aux)
            self.aux2 = InceptionAux(out_chs["inception4d"], num_classes, drop_rate_aux)
        self.num_features = chs
        self.pool = GlobalAvgPooling()
        self.dropout = nn.Dropout(p=drop_rate)
        self.classifier = nn.Linear(chs, num_classes)
        init_weights(self, conv=fan_in_normal, linear=torch_uniform)

    def forward_features(self, x: torch.Tensor, aux: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """The final map; given a list ``aux``, also the auxiliary logits (``aux1``'s, then ``aux2``'s)."""
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        if aux is not None:
            aux.append(self.aux1(x))
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        if aux is not None:
            aux.append(self.aux2(x))
        x = self.maxpool4(self.inception4e(x))
        return self.inception5b(self.inception5a(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(x)))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        aux: Optional[List[torch.Tensor]] = [] if self.aux_logits and self.training else None
        x = self.forward_head(self.forward_features(x, aux))
        return x if aux is None else (x, aux[1], aux[0])


def _create_googlenet(variant: str, pretrained: bool = False, **kwargs) -> GoogLeNet:
    return build_model_with_cfg(GoogLeNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    # MindCV names only "classifier"; the auxiliary heads (when built) are heads too, dropped by feature models.
    return dict(url=url, num_classes=1000, first_conv="conv1.conv", classifier="classifier,aux1,aux2", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "googlenet": _cfg(f"{_MS}/googlenet/googlenet-5552fcd3.ckpt"),
})


@register_model
def googlenet(pretrained: bool = False, **kwargs) -> GoogLeNet:
    return _create_googlenet("googlenet", pretrained, **kwargs)
