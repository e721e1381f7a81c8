"""Visformer, with MindCV's module tree and parameter names.

`Visformer: The Vision-friendly Transformer <https://arxiv.org/abs/2104.12533>`_.
A 7x7 stride-2 conv stem, then stages that each start with an unpadded patch
conv (kernel = stride) + BatchNorm and a learned position embedding, followed
by blocks that work on NCHW maps throughout: BatchNorm (not LayerNorm) before
a 1x1-conv MLP (with a grouped 3x3 conv in the early stages) and, in the late
stages, a 1x1-conv multi-head self-attention. The classifier is BatchNorm,
global average pooling and a linear layer. V2 (``*_v2``) adds a stride-4
stage 0 and gives every stage its own head count.

MindCV details kept here: q and k are each scaled by ``head_dim ** -0.25``
(v1, so ``q @ k^T`` carries timm's ``head_dim ** -0.5``) or by
``head_dim ** -0.5`` (v2: ``1 / head_dim`` in all); GELU is MindSpore's default
tanh approximation (timm's is exact); the convs inside the blocks have no bias,
the patch convs have one.

``feature_info``: the stem (stride 2) and the end of each stage: ``stage1``
(8), ``stage2`` (16), ``stage3`` (32), plus v2's ``stage0`` (4). v1 has no
stride-4 level. The stride-32 level is ``stage3``'s output before the
classifier's BatchNorm, as in timm. The patch convs are unpadded and drop a
remainder row or column, so maps are ``floor`` sizes of the stem's
``ceil(size / 2)`` (the cfg's ``valid_padding``).

Input sizes: the position embeddings are learned for 224 px; at other sizes
each is resampled bicubically to its stage's grid (timm's rule), for the
classifier and the feature model alike (MindCV runs only at 224). An input too
small for a patch conv raises a ``ValueError`` naming the smallest size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.fx_calls import fx_call
from ..layers.init import fan_out_normal, init_weights
from ..layers.tokens import resample_pos_map, tokens_to_nchw
from ..registry import register_model

__all__ = ["Visformer", "Block", "Attention", "Mlp", "PatchEmbed"]

_STEM_STRIDE = 2


@fx_call
def check_min_side(x: torch.Tensor, side: int, level: str) -> torch.Tensor:
    """``x``, or a ``ValueError`` when a side is under ``side`` px (too small for the level ``level``)."""
    h, w = x.shape[-2:]
    if min(h, w) < side:
        raise ValueError(f"Visformer: a {h}x{w} input is too small for {level}: "
                         f"its patch convs need inputs of at least {side} px per side")
    return x


class Mlp(nn.Module):
    """1x1 conv, GELU, [grouped 3x3 conv, GELU,] 1x1 conv; no biases. With the spatial conv the hidden
    width is ``2 * in_features`` (``5/6`` of it for ``group < 2``), as in MindCV."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, group: int = 8,
                 spatial_conv: bool = False):
        super().__init__()
        if spatial_conv:
            hidden_features = in_features * 5 // 6 if group < 2 else in_features * 2
        self.spatial_conv = spatial_conv
        self.drop = nn.Dropout(drop)
        self.conv1 = nn.Conv2d(in_features, hidden_features, 1, bias=False)
        self.act1 = nn.GELU(approximate="tanh")  # MindSpore's default GELU
        if spatial_conv:
            self.conv2 = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=group, bias=False)
            self.act2 = nn.GELU(approximate="tanh")
        self.conv3 = nn.Conv2d(hidden_features, in_features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act1(self.conv1(x)))
        if self.spatial_conv:
            x = self.act2(self.conv2(x))
        return self.drop(self.conv3(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of an NCHW map, with 1x1-conv projections.

    q and k are each multiplied by ``head_dim ** qk_scale`` (MindCV: -0.25 for v1, -0.5 for v2).
    """

    def __init__(self, dim: int, num_heads: int, head_dim_ratio: float = 1.0, qkv_bias: bool = False,
                 qk_scale: float = -0.25, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = round(dim // num_heads * head_dim_ratio)
        self.scale = self.head_dim ** qk_scale
        self.qkv = nn.Conv2d(dim, self.head_dim * num_heads * 3, 1, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Conv2d(self.head_dim * num_heads, dim, 1, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.num_heads, self.head_dim, h * w).permute(1, 0, 2, 4, 3).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale * self.scale)
        return self.proj_drop(self.proj(x.transpose(2, 3).reshape(b, -1, h, w)))


class Block(nn.Module):
    """``x + attn(norm1(x))`` (unless ``attn_disabled``), then ``x + mlp(norm2(x))``; BatchNorm norms."""

    def __init__(self, dim: int, num_heads: int, head_dim_ratio: float = 1.0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: float = -0.25, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, group: int = 8, attn_disabled: bool = False, spatial_conv: bool = False):
        super().__init__()
        self.attn_disabled = attn_disabled
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if not attn_disabled:
            self.norm1 = nn.BatchNorm2d(dim)
            self.attn = Attention(dim, num_heads, head_dim_ratio, qkv_bias, qk_scale, attn_drop, drop)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, group=group, spatial_conv=spatial_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attn_disabled:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Unpadded patch conv (kernel = stride = ``patch_size``, with bias) and BatchNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=True)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Visformer(nn.Module):
    """Visformer classifier; ``feature_info``: ``stem``, [``stage0``,] ``stage1`` .. ``stage3``.

    Args:
        img_size: the input size the position embeddings are learned for.
        init_channels: stem width.
        embed_dim: stage-2 width (stage 0: 1/4, stage 1: 1/2, stage 3: 2x).
        depth: blocks in stages 0..3 (``depth[0] == 0``: no stage 0, stage 1 patches by 4).
        num_heads: heads per stage (one int: the same in all).
        mlp_ratio, qkv_bias: MLP width over the stage width; bias of the qkv conv.
        qk_scale: exponent of ``head_dim`` applied to q and to k (-0.25 v1, -0.5 v2).
        attn_stage, spatial_conv: per stage, "1" = the blocks have attention /
            the MLP's grouped 3x3 conv.
        group: groups of that 3x3 conv.
        num_classes, in_channels: classifier outputs, input channels.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout,
            stochastic depth (rising linearly over all blocks).
    """

    def __init__(self, img_size: int = 224, init_channels: int = 32, embed_dim: int = 384,
                 depth: Sequence[int] = (0, 7, 4, 4), num_heads: Sequence[int] = (6, 6, 6, 6),
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: float = -0.25,
                 attn_stage: str = "0011", spatial_conv: str = "1100", group: int = 8, num_classes: int = 1000,
                 in_channels: int = 3, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1):
        super().__init__()
        if len(depth) != 4 or not depth[1]:
            raise ValueError(f"Visformer: depth must list 4 stages and stage 1 must have blocks, got {list(depth)}")
        if isinstance(num_heads, int):
            num_heads = (num_heads,) * 4
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, init_channels, 7, _STEM_STRIDE, padding=3, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU(),
        )
        reduction = _STEM_STRIDE
        self.feature_info: List[dict] = [dict(chs=init_channels, reduction=reduction, name="stem")]
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depth)
        # np.linspace(0, rate, total) as MindCV, without numpy so it also runs under torch.device("meta").
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        dims = (embed_dim // 4, embed_dim // 2, embed_dim, embed_dim * 2)
        head_dim_ratios = (0.25, 0.5, 1.0, 1.0)
        # Stage 1 patches by 4 when there is no stage 0, else every stage by 2.
        patches = (2, 2, 2, 2) if depth[0] else (0, 4, 2, 2)
        grid = img_size // _STEM_STRIDE
        self.stage_ids: Tuple[int, ...] = ()
        in_chs, first = init_channels, 0
        for k in range(4):
            if not depth[k]:
                continue
            grid //= patches[k]
            reduction *= patches[k]
            setattr(self, f"patch_embed{k}", PatchEmbed(patches[k], in_chs, dims[k]))
            setattr(self, f"pos_embed{k}", nn.Parameter(torch.zeros(1, dims[k], grid, grid)))
            setattr(self, f"stage{k}", nn.ModuleList([
                Block(dims[k], num_heads[k], head_dim_ratios[k], mlp_ratio, qkv_bias, qk_scale, drop_rate,
                      attn_drop_rate, dpr[i], group, attn_disabled=attn_stage[k] == "0",
                      spatial_conv=spatial_conv[k] == "1")
                for i in range(first, first + depth[k])
            ]))
            first += depth[k]
            in_chs = dims[k]
            self.stage_ids += (k,)
            self.feature_info.append(dict(chs=dims[k], reduction=reduction, name=f"stage{k}"))
        self.num_features = in_chs
        self.norm = nn.BatchNorm2d(in_chs)
        self.head = nn.Linear(in_chs, num_classes)
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        for k in self.stage_ids:
            nn.init.trunc_normal_(getattr(self, f"pos_embed{k}"), std=0.02)
        # MindCV's conv_init=True (all four variants): He normal, fan out; linear truncated N(0, 0.02).
        init_weights(self, conv=fan_out_normal, linear=lambda w: nn.init.trunc_normal_(w, std=0.02))

    def _min_side(self, levels: int) -> int:
        """The smallest input side that gives the first ``levels`` stages at least one pixel."""
        patch = math.prod(getattr(self, f"patch_embed{k}").patch_size for k in self.stage_ids[:levels])
        return _STEM_STRIDE * patch - 1  # the stem rounds up

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        x = self.stem(check_min_side(x, self._min_side(deepest), self.feature_info[deepest]["name"]))
        out = [x] if 0 in take else []
        for level, k in enumerate(self.stage_ids[:deepest], start=1):
            x = getattr(self, f"patch_embed{k}")(x)
            x = self.pos_drop(x + resample_pos_map(getattr(self, f"pos_embed{k}"), x))
            for blk in getattr(self, f"stage{k}"):
                x = blk(x)
            if level in take:
                out.append(x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head, the final norm and every stage after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.head, self.norm
        for k in self.stage_ids[deepest:]:
            delattr(self, f"patch_embed{k}")
            delattr(self, f"pos_embed{k}")
            delattr(self, f"stage{k}")
        self.stage_ids = self.stage_ids[:deepest]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_levels(x, [len(self.feature_info) - 1])[0])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_visformer(variant: str, pretrained: bool = False, **kwargs) -> Visformer:
    return build_model_with_cfg(Visformer, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def _cfg(url: str = "", **kwargs):
    # MindCV's cfg names no first conv or classifier; these are the real ones.
    return dict(
        url=url, num_classes=1000, first_conv="stem.0", classifier="head",
        fixed_input_size=True, min_input_size=(3, 31, 31),
        size_note="MindCV's position embeddings are learned for 224 px and MindCV runs only there; featurezoo "
                  "resamples them bicubically for other sizes (the patch convs need 31 px or more)",
        valid_padding="unpadded patch convs (kernel = stride) drop a remainder row or column",
        **kwargs,
    )


_MS = "https://download.mindspore.cn/toolkits/mindcv/visformer"

# timm's v1 models have our names and shapes (timm computes exact GELU; see the module docstring).
_TIMM_TWINS = {"visformer_tiny": "visformer_tiny", "visformer_small": "visformer_small"}

default_cfgs = generate_default_cfgs({
    "visformer_tiny": _cfg(f"{_MS}/visformer_tiny-daee0322.ckpt"),
    "visformer_small": _cfg(f"{_MS}/visformer_small-6c83b6db.ckpt"),
    "visformer_tiny_v2": _cfg(f"{_MS}/visformer_tiny_v2-6711a758.ckpt"),
    "visformer_small_v2": _cfg(f"{_MS}/visformer_small_v2-63674ade.ckpt"),
}, timm_twins=_TIMM_TWINS)


@dataclass(frozen=True)
class VisformerCfg:
    """A variant's shape (see :class:`Visformer`); v2 has a stage 0 and ``qk_scale=-0.5``."""

    init_channels: int
    embed_dim: int
    depth: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int]
    qk_scale: float = -0.25
    drop_path_rate: float = 0.1


model_cfgs = dict(
    visformer_tiny=VisformerCfg(init_channels=16, embed_dim=192, depth=(0, 7, 4, 4), num_heads=(3, 3, 3, 3),
                                drop_path_rate=0.03),
    visformer_small=VisformerCfg(init_channels=32, embed_dim=384, depth=(0, 7, 4, 4), num_heads=(6, 6, 6, 6)),
    visformer_tiny_v2=VisformerCfg(init_channels=24, embed_dim=192, depth=(1, 4, 6, 3), num_heads=(1, 3, 6, 12),
                                   qk_scale=-0.5, drop_path_rate=0.03),
    visformer_small_v2=VisformerCfg(init_channels=32, embed_dim=256, depth=(1, 10, 14, 3), num_heads=(2, 4, 8, 16),
                                    qk_scale=-0.5),
)


@register_model
def visformer_tiny(pretrained: bool = False, **kwargs) -> Visformer:
    return _create_visformer("visformer_tiny", pretrained, **kwargs)


@register_model
def visformer_small(pretrained: bool = False, **kwargs) -> Visformer:
    return _create_visformer("visformer_small", pretrained, **kwargs)


@register_model
def visformer_tiny_v2(pretrained: bool = False, **kwargs) -> Visformer:
    return _create_visformer("visformer_tiny_v2", pretrained, **kwargs)


@register_model
def visformer_small_v2(pretrained: bool = False, **kwargs) -> Visformer:
    return _create_visformer("visformer_small_v2", pretrained, **kwargs)
