"""MobileViT, with MindCV's module tree and parameter names.

`MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer
<https://arxiv.org/abs/2110.02178>`_. A 3x3 stride-2 stem, two stages of
MobileNetV2 inverted residuals, then three stages that each start with a
stride-2 inverted residual and end with a MobileViT block: a 3x3 and a 1x1
conv (each with BN and SiLU) into the transformer width, the map cut into 2x2
patches and attended across patches (one sequence per pixel position within
the patch), folded back, a 1x1 conv back to the stage width and a 3x3 conv
fusing it with the block's input. A 1x1 conv (``conv_1x1_exp``) widens the
last map before pooling and the linear classifier.

MindCV details kept here: SiLU everywhere, LayerNorm ``eps=1e-7``
(MindSpore's default), convs padded symmetrically (``(k - 1) // 2``, so every
map has ``ceil(size / reduction)`` pixels at any size), and the unfolding
resizes a map whose side is not a multiple of the patch to the next multiple
with bilinear ``align_corners=True`` interpolation (and back after folding):
at 224 px ``layer_5`` is 7x7, attended as 8x8 and returned as 7x7.

``feature_info``: ``conv_1`` (stride 2), ``layer_1`` .. ``layer_5`` and
``conv_1x1_exp``, the model's top-level modules in call order;
:meth:`MobileViT.forward_levels` is the classifier's own forward, stopped
after the deepest requested level. ``out_indices="pyramid"`` gives
``layer_1``, ``layer_2``, ``layer_3``, ``layer_4`` and ``conv_1x1_exp``.

timm's ``mobilevit_*`` are not twins: their 1x1 conv into the transformer has
no BN or SiLU, their LayerNorms use ``eps=1e-5`` and they resize with
``align_corners=False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers import GlobalAvgPooling
from ..layers.conv_norm_act import Conv2dNormActivation
from ..layers.helpers import make_divisible
from ..layers.init import fan_out_normal, init_weights, trunc_normal
from ..registry import register_model

__all__ = ["MobileViT", "MobileViTBlock", "InvertedResidual", "TransformerEncoder", "MV2Cfg", "MViTCfg",
           "MobileViTCfg"]

_LN_EPS = 1e-7  # MindSpore's LayerNorm default


def _conv_layer(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                act: bool = True) -> Conv2dNormActivation:
    """MindCV's ``ConvLayer``: conv (padding ``(k - 1) // 2``, no bias), BN, and SiLU unless ``act=False``."""
    return Conv2dNormActivation(in_chs, out_chs, kernel_size, stride, groups=groups, norm=nn.BatchNorm2d,
                                activation=nn.SiLU if act else None, has_bias=False)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (unless ``expand_ratio == 1``), 3x3 depthwise (stride here),
    1x1 projection without activation; a residual where shape allows."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {stride}")
        hidden = make_divisible(int(round(in_chs * expand_ratio)), 8)
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_layer(in_chs, hidden, 1))
        layers += [_conv_layer(hidden, hidden, 3, stride, groups=hidden), _conv_layer(hidden, out_chs, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MultiHeadAttention(nn.Module):
    """Self-attention with one fused ``qkv_proj`` and ``out_proj``, scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MultiHeadAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, dim * 3)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_proj(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_dropout.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, c))


class TransformerEncoder(nn.Module):
    """Pre-norm transformer layer; MindCV's ``pre_norm_mha`` and ``pre_norm_ffn`` sequences (SiLU MLP)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, attn_dropout: float = 0.0, dropout: float = 0.0,
                 ffn_dropout: float = 0.0):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(nn.LayerNorm(dim, eps=_LN_EPS),
                                          MultiHeadAttention(dim, num_heads, attn_dropout), nn.Dropout(dropout))
        self.pre_norm_ffn = nn.Sequential(nn.LayerNorm(dim, eps=_LN_EPS), nn.Linear(dim, ffn_dim), nn.SiLU(),
                                          nn.Dropout(ffn_dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pre_norm_mha(x)
        return x + self.pre_norm_ffn(x)


class MobileViTBlock(nn.Module):
    """Local convs, a transformer across ``patch x patch`` patches, fold, project and fuse with the input.

    Args:
        in_chs, out_chs: the block's input and output channels.
        transformer_dim, ffn_dim, num_layers, head_dim: the transformer.
        patch: side of the patches the map is cut into.
        dropout, attn_dropout, ffn_dropout: dropout rates (identity in eval).
    """

    def __init__(self, in_chs: int, out_chs: int, transformer_dim: int, ffn_dim: int, num_layers: int,
                 head_dim: int, patch: int = 2, dropout: float = 0.0, attn_dropout: float = 0.0,
                 ffn_dropout: float = 0.0):
        super().__init__()
        if transformer_dim % head_dim:
            raise ValueError(f"MobileViTBlock: transformer_dim {transformer_dim} is not a multiple of head_dim "
                             f"{head_dim}")
        self.local_rep = nn.Sequential(_conv_layer(in_chs, in_chs, 3), _conv_layer(in_chs, transformer_dim, 1))
        self.global_rep = nn.ModuleList(
            [TransformerEncoder(transformer_dim, ffn_dim, transformer_dim // head_dim, attn_dropout, dropout,
                                ffn_dropout) for _ in range(num_layers)]
            + [nn.LayerNorm(transformer_dim, eps=_LN_EPS)])
        self.conv_proj = _conv_layer(transformer_dim, in_chs, 1)
        self.fusion = _conv_layer(2 * in_chs, out_chs, 3)
        self.patch = patch

    def unfold(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, C, H, W) -> (B * p * p, n_h * n_w, C): one sequence of patches per pixel position in a patch.
        A side that is not a multiple of the patch is first resized up to one (MindCV's choice)."""
        b, c, h, w = x.shape
        p = self.patch
        new_h, new_w = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
        nh, nw = new_h // p, new_w // p
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        return x, (nh, nw)

    def fold(self, x: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
        """The inverse of :meth:`unfold`, resized back to ``size``."""
        p, (nh, nw) = self.patch, grid
        c = x.shape[-1]
        x = x.reshape(-1, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(-1, c, nh * p, nw * p)
        if (nh * p, nw * p) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches, grid = self.unfold(self.local_rep(x))
        for layer in self.global_rep:
            patches = layer(patches)
        fm = self.conv_proj(self.fold(patches, grid, (x.shape[-2], x.shape[-1])))
        return self.fusion(torch.cat((x, fm), dim=1))


class MobileViT(nn.Module):
    """MobileViT classifier; ``feature_info``: ``conv_1``, ``layer_1`` .. ``layer_5``, ``conv_1x1_exp``.

    Args:
        cfg: the variant (see ``model_cfgs``).
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, cfg: MobileViTCfg, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        chs, stem_chs = in_channels, 16
        self.conv_1 = _conv_layer(chs, stem_chs, 3, stride=2)
        chs, reduction = stem_chs, 2
        self.feature_info = [dict(chs=chs, reduction=reduction, name="conv_1")]
        for i, layer_cfg in enumerate(cfg.layers, start=1):
            layer = self._make_layer(chs, layer_cfg, cfg)
            setattr(self, f"layer_{i}", layer)
            chs, reduction = layer_cfg.out_channels, reduction * layer_cfg.stride
            self.feature_info.append(dict(chs=chs, reduction=reduction, name=f"layer_{i}"))
        exp_chs = min(cfg.last_layer_exp_factor * chs, 960)
        self.conv_1x1_exp = _conv_layer(chs, exp_chs, 1)
        self.feature_info.append(dict(chs=exp_chs, reduction=reduction, name="conv_1x1_exp"))
        self.num_features = exp_chs
        head: List[nn.Module] = [GlobalAvgPooling(), nn.Flatten()]
        if 0.0 < cfg.cls_dropout < 1.0:
            head.append(nn.Dropout(cfg.cls_dropout))
        head.append(nn.Linear(exp_chs, num_classes))
        self.classifier = nn.Sequential(*head)
        init_weights(self, conv=fan_out_normal, linear=trunc_normal(0.02, -2.0, 2.0))

    @staticmethod
    def _make_layer(chs: int, layer: Union[MV2Cfg, MViTCfg], cfg: MobileViTCfg) -> nn.Sequential:
        if isinstance(layer, MV2Cfg):
            blocks = []
            for j in range(layer.num_blocks):
                blocks.append(InvertedResidual(chs, layer.out_channels, layer.stride if j == 0 else 1,
                                               layer.expand_ratio))
                chs = layer.out_channels
            return nn.Sequential(*blocks)
        blocks = []
        if layer.stride == 2:
            blocks.append(InvertedResidual(chs, layer.out_channels, 2, layer.mv_expand_ratio))
            chs = layer.out_channels
        elif layer.stride != 1:
            raise ValueError(f"MobileViT: a MobileViT layer's stride must be 1 or 2, got {layer.stride}")
        blocks.append(MobileViTBlock(chs, layer.out_channels, layer.transformer_channels, layer.ffn_dim,
                                     layer.transformer_blocks, layer.transformer_channels // layer.num_heads,
                                     layer.patch, cfg.dropout, cfg.attn_dropout, cfg.ffn_dropout))
        return nn.Sequential(*blocks)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        for i, entry in enumerate(self.feature_info[:deepest + 1]):
            x = getattr(self, entry["name"])(x)
            if i in take:
                out.append(x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the classifier and every level after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.classifier
        for entry in self.feature_info[deepest + 1:]:
            delattr(self, entry["name"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mobilevit(variant: str, pretrained: bool = False, **kwargs) -> MobileViT:
    return build_model_with_cfg(MobileViT, pretrained, default_cfg=default_cfgs[variant], cfg=model_cfgs[variant],
                                **kwargs)


def _cfg(url: str = "", **kwargs):
    # MindCV trains and evaluates MobileViT at 256 px (its configs' image_resize); its default_cfgs name no size.
    return dict(url=url, num_classes=1000, input_size=(3, 256, 256), first_conv="conv_1.features.0",
                classifier="classifier.3", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/mobilevit"

default_cfgs = generate_default_cfgs({
    "mobilevit_xx_small": _cfg(f"{_MS}/mobilevit_xx_small-af9da8a0.ckpt"),
    "mobilevit_x_small": _cfg(f"{_MS}/mobilevit_x_small-673fc6f2.ckpt"),
    "mobilevit_small": _cfg(f"{_MS}/mobilevit_small-caf79638.ckpt"),
})


@dataclass(frozen=True)
class MV2Cfg:
    """A stage of ``num_blocks`` inverted residuals; the first one strides."""

    out_channels: int
    num_blocks: int
    stride: int
    expand_ratio: float


@dataclass(frozen=True)
class MViTCfg:
    """A stride-2 inverted residual (expansion ``mv_expand_ratio``) and a MobileViT block."""

    out_channels: int
    transformer_channels: int
    ffn_dim: int
    transformer_blocks: int
    mv_expand_ratio: float
    stride: int = 2
    num_heads: int = 4
    patch: int = 2


@dataclass(frozen=True)
class MobileViTCfg:
    """A variant: its five layers (see :class:`MobileViT`), the head width factor and dropout rates."""

    layers: Tuple[Union[MV2Cfg, MViTCfg], ...]
    last_layer_exp_factor: int = 4
    cls_dropout: float = 0.1
    dropout: float = 0.1  # after attention and the MLP in every transformer layer
    ffn_dropout: float = 0.0
    attn_dropout: float = 0.0


def _variant(widths: Tuple[int, ...], transformer: Tuple[Tuple[int, int, int], ...], exp: int) -> MobileViTCfg:
    """``widths``: the five layers' output channels; ``transformer``: (width, ffn, depth) of layers 3..5."""
    mv2 = (MV2Cfg(widths[0], 1, 1, exp), MV2Cfg(widths[1], 3, 2, exp))
    mvit = tuple(MViTCfg(w, dim, ffn, depth, exp) for w, (dim, ffn, depth) in zip(widths[2:], transformer))
    return MobileViTCfg(layers=mv2 + mvit)


model_cfgs = dict(
    mobilevit_xx_small=_variant((16, 24, 48, 64, 80), ((64, 128, 2), (80, 160, 4), (96, 192, 3)), exp=2),
    mobilevit_x_small=_variant((32, 48, 64, 80, 96), ((96, 192, 2), (120, 240, 4), (144, 288, 3)), exp=4),
    mobilevit_small=_variant((32, 64, 96, 128, 160), ((144, 288, 2), (192, 384, 4), (240, 480, 3)), exp=4),
)


@register_model
def mobilevit_xx_small(pretrained: bool = False, **kwargs) -> MobileViT:
    return _create_mobilevit("mobilevit_xx_small", pretrained, **kwargs)


@register_model
def mobilevit_x_small(pretrained: bool = False, **kwargs) -> MobileViT:
    return _create_mobilevit("mobilevit_x_small", pretrained, **kwargs)


@register_model
def mobilevit_small(pretrained: bool = False, **kwargs) -> MobileViT:
    return _create_mobilevit("mobilevit_small", pretrained, **kwargs)
