"""BiT (Big Transfer) ResNet-v2, with MindCV's module tree and parameter names.

`Big Transfer (BiT): General Visual Representation Learning <https://arxiv.org/abs/1912.11370>`_:
a pre-activation ResNet whose convolutions are weight-standardised and whose
norms are GroupNorm (32 groups, eps 1e-5). As in MindCV the weight
standardisation divides by ``sqrt(var + 1e-10)`` (population variance), the
stem pads its 7x7 conv by 3 and then zero-pads by one before a ``valid`` 3x3
max pool, and the head is ``gn -> relu -> mean -> 1x1 conv``.

``feature_info``: the stem ``conv1`` (stride 2), ``layer1``..``layer3`` and, at
stride 32, the head's ``relu`` after the final GroupNorm: in a pre-activation
network ``layer4``'s output is the un-normalised residual sum, the final norm
and activation are what close the last stage. ``output_stride`` 16 or 8 dilates
the last stages instead of striding them (timm's ResNetV2 schedule).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.helpers import total_stride
from ..layers.pooling import GlobalAvgPooling
from ..registry import register_model
from .resnet import stage_dilations

__all__ = ["BiT_ResNet", "Bottleneck", "StdConv2d"]

_NUM_GROUPS = 32


class StdConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardised per output channel at every call (no bias, as MindCV's).

    ``w_hat = (w - mean(w)) / sqrt(var(w) + eps)`` over (in, kh, kw), population variance.
    """

    eps: float = 1e-10

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups,
                         bias=False)

    # Set by reparameterize(): the weight is stored standardised and used as is.
    standardised: bool = False

    def _standardise(self, w: torch.Tensor) -> torch.Tensor:
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.standardised else self._standardise(self.weight)
        return self._conv_forward(x, w, self.bias)

    def reparameterize(self) -> None:
        """The inference path's hook (:func:`featurezoo.optimize_for_inference`): standardise the weight
        once, in place, instead of at every call (a no-op when already done)."""
        if not self.standardised:
            with torch.no_grad():
                self.weight.copy_(self._standardise(self.weight))
            self.standardised = True


def _group_norm(num_groups: int, num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, num_channels, eps=1e-5)  # MindSpore's nn.GroupNorm default


class Bottleneck(nn.Module):
    """Pre-activation bottleneck with GroupNorm; the shortcut projects the pre-activated input."""

    expansion: int = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm: Optional[Callable[[int, int], nn.Module]] = None, down_sample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        norm = norm or _group_norm
        first_dilation = first_dilation or dilation
        width = int(channels * (base_width / 64.0)) * groups
        self.gn1 = norm(_NUM_GROUPS, in_channels)
        self.conv1 = StdConv2d(in_channels, width, 1)
        self.gn2 = norm(_NUM_GROUPS, width)
        self.conv2 = StdConv2d(width, width, 3, stride, padding=first_dilation, groups=groups, dilation=first_dilation)
        self.gn3 = norm(_NUM_GROUPS, width)
        self.conv3 = StdConv2d(width, channels * self.expansion, 1)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        identity = x if self.down_sample is None else self.down_sample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + identity


class BiT_ResNet(nn.Module):  # noqa: N801 (MindCV's class name)
    """BiT ResNet-v2 classifier.

    Args:
        block: the bottleneck class.
        layers: blocks per stage.
        wf: width factor (1 for BiT-R50x1, 3 for BiT-R50x3).
        num_classes, in_channels: classifier outputs, input channels.
        groups, base_width: cardinality and width per group of the 3x3 convs.
        norm: GroupNorm-like class called as ``norm(num_groups, num_channels)``.
        output_stride: 16 or 8 dilates the last stage(s) instead of striding them.
    """

    def __init__(self, block: type = Bottleneck, layers: Sequence[int] = (3, 4, 6, 3), wf: int = 1,
                 num_classes: int = 1000, in_channels: int = 3, groups: int = 1, base_width: int = 64,
                 norm: Optional[Callable[[int, int], nn.Module]] = None, output_stride: int = 32):
        super().__init__()
        self.norm = norm or _group_norm
        self.input_channels = 64 * wf
        self.groups = groups
        self.base_with = base_width  # MindCV's spelling, kept for attribute compatibility

        self.conv1 = StdConv2d(in_channels, self.input_channels, 7, stride=2, padding=3)
        reduction = total_stride(self.conv1)
        self.feature_info = [dict(chs=self.input_channels, reduction=reduction, name="conv1")]
        # Zero padding, then a "valid" pool: the stem conv's outputs may be negative, so this is not
        # a -inf-padded pool.
        self.pad = nn.ConstantPad2d(1, 0.0)
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2)
        reduction *= total_stride(self.max_pool)
        num_stages = len(layers)
        plan = stage_dilations(output_stride, reduction, num_stages)
        for i, (channels, num_blocks, (stride, first_dilation, dilation)) in enumerate(
                zip((64, 128, 256, 512), layers, plan)):
            reduction *= stride
            self.add_module(f"layer{i + 1}", self._make_layer(block, channels * wf, num_blocks, stride, dilation,
                                                              first_dilation))
            if i < num_stages - 1:  # the last stage is closed by the final norm and activation below
                self.feature_info.append(dict(chs=self.input_channels, reduction=reduction, name=f"layer{i + 1}",
                                              stage=i + 1))

        self.gn = self.norm(_NUM_GROUPS, self.input_channels)
        self.relu = nn.ReLU()
        self.feature_info.append(dict(chs=self.input_channels, reduction=reduction, name="relu", stage=num_stages))
        self.pool = GlobalAvgPooling(keep_dims=True)
        self.num_features = self.input_channels
        self.classifier = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)

    def _make_layer(self, block: type, channels: int, num_blocks: int, stride: int = 1, dilation: int = 1,
                    first_dilation: int = 1) -> nn.Sequential:
        out_channels = channels * block.expansion
        down_sample = None
        if stride != 1 or self.input_channels != out_channels:
            down_sample = nn.Sequential(StdConv2d(self.input_channels, out_channels, 1, stride))
        blocks: List[nn.Module] = [block(self.input_channels, channels, stride, self.groups, self.base_with,
                                         self.norm, down_sample, dilation=dilation, first_dilation=first_dilation)]
        self.input_channels = out_channels
        blocks += [block(out_channels, channels, 1, self.groups, self.base_with, self.norm, dilation=dilation)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages (MindCV splits the stem off into ``root``)."""
        x = self.max_pool(self.pad(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.pool(self.relu(self.gn(x))))
        return x[..., 0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_bit(variant: str, pretrained: bool = False, **kwargs) -> BiT_ResNet:
    return build_model_with_cfg(BiT_ResNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="conv1", classifier="classifier", output_strides=(8, 16, 32),
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters (timm's BiT stem also zero-pads before a valid max
# pool, and its head is the same GroupNorm, ReLU, mean and 1x1 conv). Not identical in numbers at any size:
# timm's StdConv2d standardises with eps 1e-8, MindCV's with 1e-10 (tests/test_resnet_variants.py aligns the
# eps and then finds ours and timm's equal to 1e-8 in float64).
_TIMM_TWINS = {"BiT_resnet50": "resnetv2_50x1_bit", "BiT_resnet50x3": "resnetv2_50x3_bit",
              "BiT_resnet101": "resnetv2_101x1_bit"}

_TIMM_RENAMES = (
    (r"^stem\.conv\.", "conv1."), *((rf"^stages\.{i}\.blocks\.", f"layer{i + 1}.") for i in range(4)),
    (r"\.norm(\d)\.", r".gn\1."), (r"\.downsample\.conv\.", ".down_sample.0."), (r"^norm\.", "gn."),
    (r"^head\.fc\.", "classifier."),
)


default_cfgs = generate_default_cfgs({
    "BiT_resnet50": _cfg(f"{_MS}/bit/BiT_resnet50-1e4795a4.ckpt"),
    "BiT_resnet50x3": _cfg(f"{_MS}/bit/BiT_resnet50x3-a960f91f.ckpt"),
    "BiT_resnet101": _cfg(f"{_MS}/bit/BiT_resnet101-2efa9106.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def BiT_resnet50(pretrained: bool = False, **kwargs) -> BiT_ResNet:  # noqa: N802 (MindCV's model name)
    return _create_bit("BiT_resnet50", pretrained, layers=(3, 4, 6, 3), **kwargs)


@register_model
def BiT_resnet50x3(pretrained: bool = False, **kwargs) -> BiT_ResNet:  # noqa: N802
    return _create_bit("BiT_resnet50x3", pretrained, layers=(3, 4, 6, 3), wf=3, **kwargs)


@register_model
def BiT_resnet101(pretrained: bool = False, **kwargs) -> BiT_ResNet:  # noqa: N802
    return _create_bit("BiT_resnet101", pretrained, layers=(3, 4, 23, 3), **kwargs)
