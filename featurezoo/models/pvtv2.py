"""PVTv2 (Pyramid Vision Transformer v2), with MindCV's module tree and parameter names.

`PVT v2: Improved Baselines with Pyramid Vision Transformer <https://arxiv.org/abs/2106.13797>`_.
Four stages, each an overlapping patch embedding (a 7x7 stride-4 conv, then
3x3 stride-2 convs), blocks of spatial-reduction attention and an MLP with a
3x3 depthwise conv, and a LayerNorm. No position embeddings: every size runs.

MindCV's computation, kept exactly:

* the patch-embedding convs pad MindSpore's ``same`` way, ``ceil(size /
  stride)`` outputs with the odd pixel at the bottom/right (7x7 stride 4 pads
  1 before and 2 after at 224 px; 3x3 stride 2 pads 0 and 1), where timm pads
  3 / 1 on both sides;
* the patch-embedding and spatial-reduction LayerNorms use MindSpore's default
  eps 1e-7 (timm: 1e-5); the block and stage norms 1e-6;
* GELU is the tanh approximation (timm: exact);
* logits are the token mean after ``norm_list.3``, then ``head``.

``feature_info``: the output of each stage's LayerNorm (``norm_list.i``) as an
NCHW map, strides 4, 8, 16, 32. :meth:`PyramidVisionTransformerV2.forward_levels`
is the classifier's own stage loop, stopping after the deepest requested level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.init import fan_out_normal, init_weights, normal, trunc_normal
from ..layers.padding import Conv2d
from ..layers.sr_attention import SpatialReductionAttention
from ..layers.tokens import tokens_to_nchw
from ..registry import register_model

__all__ = ["PyramidVisionTransformerV2", "OverlapPatchEmbed", "Block"]


class DWConv(nn.Module):
    """3x3 depthwise conv over the tokens of an ``h x w`` map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        # A channels-last view of the tokens (no copy), as timm does: the conv runs on it directly.
        return self.dwconv(x.transpose(1, 2).view(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1, depthwise conv, GELU (tanh), fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm residual block: spatial-reduction attention, then the convolutional MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialReductionAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class OverlapPatchEmbed(nn.Module):
    """Conv with MindSpore's ``same`` padding, then LayerNorm (eps 1e-7) over the tokens."""

    def __init__(self, in_chs: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = Conv2d(in_chs, dim, kernel_size, stride, pad_mode="same", has_bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-7)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class PyramidVisionTransformerV2(nn.Module):
    """PVTv2 classifier; ``feature_info``: ``norm_list.0`` .. ``norm_list.3`` (strides 4 to 32).

    Args:
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per stage.
        qkv_bias: biases in ``q`` and ``kv``.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after projections,
            on attention weights, and stochastic depth (linear over the blocks).
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_classes: int = 1000,
                 in_channels: int = 3):
        super().__init__()
        n = sum(depths)
        dpr = [drop_path_rate * j / max(n - 1, 1) for j in range(n)]  # MindCV's linspace(0, rate, n)
        self.patch_embed_list = nn.ModuleList()
        self.block_list = nn.ModuleList()
        self.norm_list = nn.ModuleList()
        self.feature_info = []
        chs, reduction, cur = in_channels, 1, 0
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            kernel_size, stride = (7, 4) if i == 0 else (3, 2)
            self.patch_embed_list.append(OverlapPatchEmbed(chs, dim, kernel_size, stride))
            self.block_list.append(nn.ModuleList(
                Block(dim, num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias, drop_rate, attn_drop_rate,
                      dpr[cur + j]) for j in range(depth)))
            self.norm_list.append(nn.LayerNorm(dim, eps=1e-6))
            chs, reduction, cur = dim, reduction * stride, cur + depth
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"norm_list.{i}"))
        self.num_features = chs
        self.head = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        # MindCV: Dense ~ TruncatedNormal(0.02), Conv ~ N(0, sqrt(2 / fan_out)) with fan_out counted per group
        # (9 for the 3x3 depthwise convs).
        depthwise = {m.dwconv: normal(math.sqrt(2.0 / 9)) for m in self.modules() if isinstance(m, DWConv)}
        init_weights(self, conv=fan_out_normal, linear=trunc_normal(0.02, -2.0, 2.0), special=depthwise)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i``: NCHW in, NCHW out (the tokens after ``norm_list[i]``)."""
        x, h, w = self.patch_embed_list[i](x)
        for block in self.block_list[i]:
            x = block(x, h, w)
        return tokens_to_nchw(self.norm_list[i](x), (h, w))

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        for i in range(deepest + 1):
            x = self._stage(i, x)
            if i in take:
                out.append(x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every stage after the deepest level in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.head
        for stages in (self.patch_embed_list, self.block_list, self.norm_list):
            del stages[deepest + 1:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))  # MindCV: the mean of the final tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_pvtv2(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return build_model_with_cfg(PyramidVisionTransformerV2, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="patch_embed_list.0.proj", classifier="head", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/pvt_v2"
# timm's pvt_v2_b* have our parameters, one for one. They compute another function (see the module docstring:
# patch-embedding padding, two LayerNorm eps, exact GELU); tests/test_pvtv2.py swaps those back and compares.
_TIMM_TWINS = {f"pvt_v2_b{i}": f"pvt_v2_b{i}" for i in range(6)}
_TIMM_RENAMES = (
    (r"^patch_embed\.", "patch_embed_list.0."),
    (r"^stages\.(\d+)\.downsample\.", r"patch_embed_list.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"block_list.\1."),
    (r"^stages\.(\d+)\.norm\.", r"norm_list.\1."),
    (r"\.mlp\.dwconv\.", ".mlp.dwconv.dwconv."),
)

default_cfgs = generate_default_cfgs({
    "pvt_v2_b0": _cfg(f"{_MS}/pvt_v2_b0-1c4f6683.ckpt"),
    "pvt_v2_b1": _cfg(f"{_MS}/pvt_v2_b1-3ceb171a.ckpt"),
    "pvt_v2_b2": _cfg(f"{_MS}/pvt_v2_b2-0565d18e.ckpt"),
    "pvt_v2_b3": _cfg(f"{_MS}/pvt_v2_b3-feaae3fc.ckpt"),
    "pvt_v2_b4": _cfg(f"{_MS}/pvt_v2_b4-1cf4bc03.ckpt"),
    "pvt_v2_b5": _cfg(),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@dataclass(frozen=True)
class PvtV2Cfg:
    """A variant's widths, depths and MLP ratios; heads (1, 2, 5, 8) and reductions (8, 4, 2, 1) are shared."""

    embed_dims: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]
    mlp_ratios: Tuple[float, float, float, float] = (8, 8, 4, 4)
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)


_W = (64, 128, 320, 512)
model_cfgs = dict(
    pvt_v2_b0=PvtV2Cfg(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    pvt_v2_b1=PvtV2Cfg(embed_dims=_W, depths=(2, 2, 2, 2)),
    pvt_v2_b2=PvtV2Cfg(embed_dims=_W, depths=(3, 4, 6, 3)),
    pvt_v2_b3=PvtV2Cfg(embed_dims=_W, depths=(3, 4, 18, 3)),
    pvt_v2_b4=PvtV2Cfg(embed_dims=_W, depths=(3, 8, 27, 3)),
    pvt_v2_b5=PvtV2Cfg(embed_dims=_W, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
)


@register_model
def pvt_v2_b0(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return _create_pvtv2("pvt_v2_b0", pretrained, **kwargs)


@register_model
def pvt_v2_b1(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return _create_pvtv2("pvt_v2_b1", pretrained, **kwargs)


@register_model
def pvt_v2_b2(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return _create_pvtv2("pvt_v2_b2", pretrained, **kwargs)


@register_model
def pvt_v2_b3(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return _create_pvtv2("pvt_v2_b3", pretrained, **kwargs)


@register_model
def pvt_v2_b4(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return _create_pvtv2("pvt_v2_b4", pretrained, **kwargs)


@register_model
def pvt_v2_b5(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    return _create_pvtv2("pvt_v2_b5", pretrained, **kwargs)
