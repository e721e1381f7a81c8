"""ConvNeXt and ConvNeXt V2, with MindCV's module tree and parameter names.

`A ConvNet for the 2020s <https://arxiv.org/abs/2201.03545>`_ and
`ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders
<https://arxiv.org/abs/2301.00808>`_.

MindCV details kept here: every LayerNorm uses ``epsilon=1e-6`` (MindSpore's
default would be 1e-7); GELU is MindSpore's default tanh approximation; the
stem (k4 s4) and downsampling (k2 s2) convs use MindSpore's ``same`` padding,
which only matters for inputs that are not a multiple of the stride; the
layer-scale parameter is a plain parameter named ``gamma_`` and V2's GRN keeps
its ``gamma``/``beta``, so a MindCV checkpoint maps onto them unchanged.

``output_stride=16`` (or 8) follows timm's ConvNeXt: a stage whose downsampling
would pass that stride keeps its 2x2 conv at stride 1 with the dilation before
the stage (``same`` padding), and its blocks' 7x7 convs take the new dilation.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.activation import GELU
from ..layers.drop_path import DropPath
from ..layers.padding import Conv2d
from ..registry import register_model

__all__ = ["ConvNeXt", "Block", "GRN", "ConvNextLayerNorm"]

_LN_EPS = 1e-6
_STEM_STRIDE = 4
_DOWNSAMPLE_STRIDE = 2


class GRN(nn.Module):
    """Global Response Normalization on channels-last input (N, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNextLayerNorm(nn.LayerNorm):
    """LayerNorm over channels, for channels-last input (``norm_axis=-1``) or
    channels-first NCHW input (``norm_axis=1``)."""

    def __init__(self, normalized_shape: Sequence[int], epsilon: float, norm_axis: int = -1):
        if norm_axis not in (-1, 1):
            raise ValueError(f"ConvNextLayerNorm: norm_axis must be 1 or -1, got {norm_axis!r}")
        super().__init__(tuple(normalized_shape), eps=epsilon)
        self.norm_axis = norm_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_axis == -1:
            return super().forward(x)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_axis={self.norm_axis}"


class Block(nn.Module):
    """Depthwise 7x7 conv -> channels-last LayerNorm -> Linear -> GELU [-> GRN] -> Linear
    [-> layer scale] -> residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 use_grn: bool = False, dilation: int = 1):
        super().__init__()
        self.dwconv = Conv2d(dim, dim, kernel_size=7, dilation=dilation, group=dim, has_bias=True)
        self.norm = ConvNextLayerNorm((dim,), epsilon=_LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = GELU(approximate="tanh", inplace=True)  # on pwconv1's fresh output
        self.use_grn = use_grn
        if use_grn:
            self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma_ = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.register_parameter("gamma_", None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        x = self.act(self.pwconv1(x))
        if self.use_grn:
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.gamma_ is not None:
            x = self.gamma_ * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt / ConvNeXt V2 classifier.

    ``feature`` alternates downsampling layers and stages (``feature.0`` is the
    stem); ``feature_info`` names the four stages ``feature.1``, ``feature.3``,
    ``feature.5``, ``feature.7`` at reductions 4, 8, 16, 32, as MindCV does
    (``stage`` 1 to 4).

    Args:
        in_channels, num_classes: input channels, classifier outputs.
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth rate, rising linearly over all blocks.
        layer_scale_init_value: initial layer scale; 0 disables it (V2).
        head_init_scale: factor applied to the initial classifier weights.
        use_grn: Global Response Normalization in every block (V2).
        output_stride: 32, or 16 / 8 to dilate the stages past that stride instead of downsampling.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0, use_grn: bool = False,
                 output_stride: int = 32):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"ConvNeXt: depths {list(depths)} and dims {list(dims)} differ in length")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"ConvNeXt: output_stride must be 8, 16 or 32, got {output_stride!r}")
        self.feature_info: List[dict] = []

        total = sum(depths)
        # np.linspace(0, rate, total) as MindCV, without numpy so it also runs under torch.device("meta").
        dp_rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        layers: List[nn.Module] = []
        reduction, cur, dilation = 1, 0, 1
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i == 0:
                stride = _STEM_STRIDE
                down = nn.Sequential(
                    Conv2d(in_channels, dim, kernel_size=stride, stride=stride, has_bias=True),
                    ConvNextLayerNorm((dim,), epsilon=_LN_EPS, norm_axis=1),
                )
            else:
                stride, first_dilation = _DOWNSAMPLE_STRIDE, dilation
                if reduction * stride > output_stride:  # the 2x2 conv stays (timm), at stride 1, dilated
                    stride, dilation = 1, dilation * stride
                down = nn.Sequential(
                    ConvNextLayerNorm((dims[i - 1],), epsilon=_LN_EPS, norm_axis=1),
                    Conv2d(dims[i - 1], dim, kernel_size=_DOWNSAMPLE_STRIDE, stride=stride, dilation=first_dilation,
                           has_bias=True),
                )
            reduction *= stride
            stage = nn.Sequential(*[
                Block(dim, drop_path=dp_rates[cur + j], layer_scale_init_value=layer_scale_init_value,
                      use_grn=use_grn, dilation=dilation)
                for j in range(depth)
            ])
            cur += depth
            layers += [down, stage]
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"feature.{len(layers) - 1}",
                                          stage=i + 1))
        self.feature = nn.Sequential(*layers)
        self.num_features = dims[-1]
        self.norm = ConvNextLayerNorm((dims[-1],), epsilon=_LN_EPS)
        self.classifier = nn.Linear(dims[-1], num_classes)
        self.head_init_scale = head_init_scale
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.classifier.weight.mul_(self.head_init_scale)
        self.classifier.bias.mul_(self.head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.feature(x).mean(dim=(-2, -1)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_convnext(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXt:
    return build_model_with_cfg(ConvNeXt, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="feature.0.0", classifier="classifier",
                output_strides=(8, 16, 32), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters. They never compute exactly what we do: MindCV's
# GELU is the tanh approximation, timm's the exact (erf) one. No twins for V2: timm's convnextv2_* have our
# parameters, but their MLPs are 1x1 convs (4-D weights, Linear here) and their GRN gamma/beta are (C,)
# where MindCV's are (1, 1, 1, C), so those tensors would need reshapes.
_TIMM_TWINS = {n: n for n in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge")}

# timm's stages.<i>.downsample / .blocks are feature.<2i> / feature.<2i + 1> here (stage 0's downsample is
# the stem).
_TIMM_RENAMES = (
    (r"^stem\.", "feature.0."),
    *((rf"^stages\.{i}\.downsample\.", f"feature.{2 * i}.") for i in range(1, 4)),
    *((rf"^stages\.{i}\.blocks\.", f"feature.{2 * i + 1}.") for i in range(4)),
    (r"\.gamma$", ".gamma_"), (r"\.conv_dw\.", ".dwconv."), (r"\.mlp\.fc1\.", ".pwconv1."),
    (r"\.mlp\.fc2\.", ".pwconv2."), (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "classifier."),
)


default_cfgs = generate_default_cfgs({
    "convnext_tiny": _cfg(f"{_MS}/convnext/convnext_tiny-ae5ff8d7.ckpt"),
    "convnext_small": _cfg(f"{_MS}/convnext/convnext_small-e23008f3.ckpt"),
    "convnext_base": _cfg(f"{_MS}/convnext/convnext_base-ee3544b8.ckpt"),
    "convnext_large": _cfg(),
    "convnext_xlarge": _cfg(),
    "convnextv2_atto": _cfg(),
    "convnextv2_femto": _cfg(),
    "convnextv2_pico": _cfg(),
    "convnextv2_nano": _cfg(),
    "convnextv2_tiny": _cfg(),
    "convnextv2_base": _cfg(),
    "convnextv2_large": _cfg(),
    "convnextv2_huge": _cfg(),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


_V2 = dict(use_grn=True, layer_scale_init_value=0.0)


@register_model
def convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnext_tiny", pretrained, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kwargs)


@register_model
def convnext_small(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnext_small", pretrained, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **kwargs)


@register_model
def convnext_base(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnext_base", pretrained, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024),
                            **kwargs)


@register_model
def convnext_large(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnext_large", pretrained, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536),
                            **kwargs)


@register_model
def convnext_xlarge(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnext_xlarge", pretrained, depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048),
                            **kwargs)


@register_model
def convnextv2_atto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_atto", pretrained, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320),
                            **_V2, **kwargs)


@register_model
def convnextv2_femto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_femto", pretrained, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384),
                            **_V2, **kwargs)


@register_model
def convnextv2_pico(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_pico", pretrained, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512),
                            **_V2, **kwargs)


@register_model
def convnextv2_nano(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_nano", pretrained, depths=(2, 2, 8, 2), dims=(80, 160, 320, 640),
                            **_V2, **kwargs)


@register_model
def convnextv2_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_tiny", pretrained, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                            **_V2, **kwargs)


@register_model
def convnextv2_base(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_base", pretrained, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024),
                            **_V2, **kwargs)


@register_model
def convnextv2_large(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_large", pretrained, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536),
                            **_V2, **kwargs)


@register_model
def convnextv2_huge(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return _create_convnext("convnextv2_huge", pretrained, depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816),
                            **_V2, **kwargs)
