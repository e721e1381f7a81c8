"""PVT (Pyramid Vision Transformer v1), with MindCV's module tree and parameter names.

`Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without
Convolutions <https://arxiv.org/abs/2102.12122>`_. Four stages, each a
non-overlapping patch embedding (stride 4, then 2), an absolute position
embedding, and blocks of spatial-reduction attention and an MLP; stage 4
prepends a class token, whose final LayerNorm output feeds the head.

MindCV's computation, kept exactly at its native 224 px:

* ``pos_embed1``..``pos_embed4`` are float16 parameters (as in MindCV's
  checkpoints); they are added to the float32 tokens after conversion, so the
  sum is MindSpore's float32 one;
* LayerNorm eps: patch embeddings and ``norm1`` 1e-5, ``norm2`` and the final
  ``norm`` 1e-6, the spatial-reduction ``attn.norm`` MindSpore's default 1e-7;
* GELU is the tanh approximation; patch-embedding and spatial-reduction convs
  pad MindSpore's ``same`` way (only at sizes not a multiple of their stride).

Other sizes: MindCV adds ``pos_embed1`` unresized, so its model runs at 224 px
only (and its stage grids use floor division, which breaks at sizes not a
multiple of 32). Here every position embedding is resampled bicubically
(:func:`featurezoo.layers.tokens.resample_pos_embed`, as timm does) to the
stage's token grid when it differs from the native one, and the grids follow
the ``same``-padded convs (``ceil(size / stride)``), so feature models (and
the classifier) run at any size; at 224 px nothing is resampled.

``feature_info``: the output of each stage's last block (``Blocks.i``) as an
NCHW map, strides 4, 8, 16, 32; stage 4's map leaves out the class token.
:meth:`PyramidVisionTransformer.forward_levels` runs the classifier's own stage
loop and stops after the deepest requested level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.init import fan_out_normal, init_weights, trunc_normal
from ..layers.padding import Conv2d
from ..layers.sr_attention import SpatialReductionAttention
from ..layers.tokens import resample_pos_embed, tokens_to_nchw
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["PyramidVisionTransformer", "PatchEmbed", "Block"]


class Block(nn.Module):
    """Pre-norm residual block: spatial-reduction attention, then the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SpatialReductionAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Stride-``patch`` conv (MindSpore's ``same`` padding), then LayerNorm (eps 1e-5) over the tokens."""

    def __init__(self, in_chs: int, dim: int, patch: int):
        super().__init__()
        self.proj = Conv2d(in_chs, dim, patch, patch, pad_mode="same", has_bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class PyramidVisionTransformer(nn.Module):
    """PVT classifier; ``feature_info``: ``Blocks.0`` .. ``Blocks.3`` (strides 4 to 32).

    Args:
        img_size: the native input size (position embeddings are learned for its grids).
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per stage.
        qkv_bias: biases in ``q`` and ``kv``.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after projections,
            on attention weights, and stochastic depth.
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, img_size: int = 224, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        n = sum(depths)
        dpr = [drop_path_rate * j / max(n - 1, 1) for j in range(n)]  # MindCV's linspace(0, rate, n)
        self.num_stages = len(depths)
        self.feature_info = []
        self.pos_grids: List[Tuple[int, int]] = []  # the native token grid of each stage
        blocks, chs, reduction, cur = [], in_channels, 1, 0
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            patch = 4 if i == 0 else 2
            reduction *= patch
            side = img_size // reduction
            self.pos_grids.append((side, side))
            cls = int(i == self.num_stages - 1)  # the class token joins in the last stage
            # MindCV's position embeddings are float16 parameters, initialised to zero.
            self.register_parameter(f"pos_embed{i + 1}",
                                    nn.Parameter(torch.zeros(1, side * side + cls, dim, dtype=torch.float16)))
            self.add_module(f"patch_embed{i + 1}", PatchEmbed(chs, dim, patch))
            blocks.append(nn.ModuleList(
                Block(dim, num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias, drop_rate, attn_drop_rate,
                      dpr[cur + j]) for j in range(depth)))
            cur += depths[0]  # sic: MindCV's schedule advances by the first stage's depth
            chs = dim
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"Blocks.{i}"))
        self.Blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(chs, eps=1e-6)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, chs))
        self.num_features = chs
        self.head = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, conv=fan_out_normal, linear=trunc_normal(0.02, -2.0, 2.0))

    def _run_stages(self, x: torch.Tensor, take: FrozenSet[int], deepest: int
                    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Stages 0..``deepest``: the NCHW maps of the stages in ``take`` and the last stage's tokens
        (with the class token first if the last stage ran)."""
        out = []
        for i in range(deepest + 1):
            x, h, w = getattr(self, f"patch_embed{i + 1}")(x)
            cls = i == self.num_stages - 1
            if cls:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            pos = resample_pos_embed(getattr(self, f"pos_embed{i + 1}"), (h, w), self.pos_grids[i],
                                     num_prefix_tokens=int(cls))
            x = x + pos.to(x.dtype)
            for block in self.Blocks[i]:
                x = block(x, h, w)
            if i in take:
                out.append(tokens_to_nchw(x[:, 1:] if cls else x, (h, w)))
            if not cls and i < deepest:
                x = tokens_to_nchw(x, (h, w))
        return out, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        return self._run_stages(x, take, deepest)[0]

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head, the final norm and every stage (and the class token) after the deepest level."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.head, self.norm
        for i in range(deepest + 1, self.num_stages):
            delattr(self, f"patch_embed{i + 1}")
            delattr(self, f"pos_embed{i + 1}")
        del self.Blocks[deepest + 1:]
        if deepest < self.num_stages - 1:
            del self.cls_token

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final LayerNorm."""
        return self.norm(self._run_stages(x, frozenset(), self.num_stages - 1)[1])[:, 0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return build_model_with_cfg(PyramidVisionTransformer, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="patch_embed1.proj", classifier="head",
                fixed_input_size=True,
                size_note="MindCV's classifier adds pos_embed1 (a 56x56 grid) unresized: 224 px only. Here "
                          "position embeddings are resampled (bicubic) for other sizes, so features run at any "
                          "size", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/pvt"
# No timm twin: timm has no PVT v1.
default_cfgs = generate_default_cfgs({
    "pvt_tiny": _cfg(f"{_MS}/pvt_tiny-6abb953d.ckpt"),
    "pvt_small": _cfg(f"{_MS}/pvt_small-213c2ed1.ckpt"),
    "pvt_medium": _cfg(f"{_MS}/pvt_medium-469e6802.ckpt"),
    "pvt_large": _cfg(f"{_MS}/pvt_large-bb6895d7.ckpt"),
})


@dataclass(frozen=True)
class PvtCfg:
    """A variant's depths; widths, heads, MLP and reduction ratios are shared by all four."""

    depths: Tuple[int, int, int, int]


model_cfgs = dict(
    pvt_tiny=PvtCfg(depths=(2, 2, 2, 2)),
    pvt_small=PvtCfg(depths=(3, 4, 6, 3)),
    pvt_medium=PvtCfg(depths=(3, 4, 18, 3)),
    pvt_large=PvtCfg(depths=(3, 8, 27, 3)),
)


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt("pvt_tiny", pretrained, **kwargs)


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt("pvt_small", pretrained, **kwargs)


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt("pvt_medium", pretrained, **kwargs)


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt("pvt_large", pretrained, **kwargs)
