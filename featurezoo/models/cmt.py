"""CMT (Convolutional Neural Networks Meet Vision Transformers), with MindCV's module tree and parameter names.

`CMT: Convolutional Neural Networks Meet Vision Transformers <https://arxiv.org/abs/2107.06263>`_.
A stem of three 3x3 convs (the first with stride 2), each followed by GELU
and then BatchNorm; four stages, each a 2x2 stride-2 patch embedding (conv +
LayerNorm) and blocks that work on tokens with the grid ``(H, W)`` passed
along: a depthwise 3x3 conv on the map added to itself (local perception),
attention whose keys and values come from a depthwise ``sr x sr`` stride-``sr``
conv + BN of the map (8, 4, 2, 1 by stage), and an MLP of 1x1 convs around a
depthwise 3x3 conv on the map. The head is a 1x1 conv to 1280 channels, BN,
SiLU, global average pooling and a linear classifier.

MindCV details kept here: GELU is MindSpore's tanh approximation, LayerNorm
``eps=1e-7``, the patch embeddings and the reduction convs pad ``same`` (extra
row/column bottom/right where a side is odd), so every map has
``ceil(size / reduction)`` pixels. MindCV adds a ``relative_pos`` to the
attention logits, but builds it as a zero constant (it is no parameter and is
not in the checkpoint; the paper's learned relative position bias is not
there). The buffers ``relative_pos_a`` .. ``relative_pos_d`` keep MindCV's
zeros at the native grid (non-persistent); at any other grid the model adds
nothing, which is what adding MindCV's zeros rebuilt for that grid computes.

Input sizes: MindCV's CMT accepts only its native size (160, 192, 224, 256 px
for tiny, xsmall, small, base): its patch embeddings assert it and its
``relative_pos`` is shaped for it. Here the classifier and the feature model
run at any size.

``feature_info``: ``stem_norm3`` (stride 2) and the last block of each stage
(strides 4, 8, 16, 32), every one NCHW. :meth:`CMT.forward_levels` is the
classifier's own forward, stopped after the deepest requested level. timm
has no CMT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.fx_calls import fx_call
from ..layers.init import fan_out_normal, init_weights, trunc_normal
from ..layers.padding import Conv2d
from ..layers.tokens import nchw_to_tokens, tokens_to_nchw
from ..registry import register_model

__all__ = ["CMT", "Block", "Attention", "Mlp", "PatchEmbed", "CMTCfg"]

_LN_EPS = 1e-7  # MindSpore's LayerNorm default
_STAGES = ("a", "b", "c", "d")
Grid = Tuple[int, int]


def _gelu() -> nn.GELU:
    return nn.GELU(approximate="tanh")  # MindSpore's nn.GELU() default


@fx_call
def relative_pos_for(rel: torch.Tensor, grid: Grid, kv: Grid) -> Optional[torch.Tensor]:
    """MindCV's zero ``relative_pos`` buffer ``rel`` where it is shaped for the token grid ``grid`` (keys and
    values on ``kv``), else ``None``: MindCV's zeros rebuilt for another grid add nothing."""
    return rel if tuple(rel.shape[-2:]) == (grid[0] * grid[1], kv[0] * kv[1]) else None


class Mlp(nn.Module):
    """1x1 conv, GELU, BN; depthwise 3x3 conv added to its input, GELU, BN; 1x1 conv, BN (on the map)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_features, hidden_features, 1), _gelu(), nn.BatchNorm2d(hidden_features))
        self.proj = nn.Conv2d(hidden_features, hidden_features, 3, 1, padding=1, groups=hidden_features)
        self.proj_act = _gelu()
        self.proj_bn = nn.BatchNorm2d(hidden_features)
        self.conv2 = nn.Sequential(nn.Conv2d(hidden_features, in_features, 1), nn.BatchNorm2d(in_features))
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = self.drop(self.conv1(tokens_to_nchw(x, grid)))
        x = self.proj_bn(self.proj_act(self.proj(x) + x))
        return self.drop(nchw_to_tokens(self.conv2(x)))


class Attention(nn.Module):
    """Multi-head attention; keys and values from the map reduced by a depthwise ``sr_ratio`` conv + BN."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, qk_ratio: int = 1, sr_ratio: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qk_dim = dim // qk_ratio
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            # MindSpore's default pad_mode="same": ceil(side / sr) keys per side at any size.
            self.sr = nn.Sequential(Conv2d(dim, dim, sr_ratio, sr_ratio, group=dim, has_bias=True),
                                    nn.BatchNorm2d(dim))

    def kv_grid(self, grid: Grid) -> Grid:
        """The grid of keys and values for a query grid."""
        return tuple(-(-s // self.sr_ratio) for s in grid)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, grid: Grid, relative_pos: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, self.qk_dim // h).transpose(1, 2)
        kv = nchw_to_tokens(self.sr(tokens_to_nchw(x, grid))) if self.sr_ratio > 1 else x
        k = self.k(kv).reshape(b, -1, h, self.qk_dim // h).transpose(1, 2)
        v = self.v(kv).reshape(b, -1, h, c // h).transpose(1, 2)
        drop = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=relative_pos, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Local perception (depthwise 3x3 conv, residual), then pre-norm attention and MLP, on tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 qk_ratio: int = 1, sr_ratio: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, qk_ratio, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.proj = nn.Conv2d(dim, dim, 3, 1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: Grid, relative_pos: Optional[torch.Tensor]) -> torch.Tensor:
        cnn_feat = tokens_to_nchw(x, grid)
        x = nchw_to_tokens(self.proj(cnn_feat) + cnn_feat)
        x = x + self.drop_path(self.attn(self.norm1(x), grid, relative_pos))
        return x + self.drop_path(self.mlp(self.norm2(x), grid))


class PatchEmbed(nn.Module):
    """2x2 stride-2 conv (``same`` padding) and LayerNorm; returns tokens and their grid.

    ``num_patches`` is the token count at the model's native size (MindCV's).
    """

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, patch_size: int = 2):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = Conv2d(in_chans, embed_dim, patch_size, patch_size, has_bias=True)
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        x = self.proj(x)
        return self.norm(nchw_to_tokens(x)), (x.shape[-2], x.shape[-1])


class CMT(nn.Module):
    """CMT classifier; ``feature_info``: ``stem_norm3`` and ``blocks_a`` .. ``blocks_d`` (last block of each).

    Args:
        img_size: the native input side (MindCV's; fixes the shape of the zero ``relative_pos`` buffers).
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per stage.
        stem_channel: width of the stem.
        fc_dim: width of the head's 1x1 conv.
        qkv_bias, qk_scale, qk_ratio: attention options.
        drop_rate, attn_drop_rate, drop_path_rate: dropout rates (identity in eval).
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, img_size: int = 224, embed_dims: Sequence[int] = (46, 92, 184, 368),
                 depths: Sequence[int] = (2, 2, 10, 2), num_heads: Sequence[int] = (1, 2, 4, 8),
                 mlp_ratios: Sequence[float] = (3.6, 3.6, 3.6, 3.6), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 stem_channel: int = 16, fc_dim: int = 1280, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 qk_ratio: int = 1, drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        chs = in_channels
        for i in (1, 2, 3):
            setattr(self, f"stem_conv{i}", nn.Conv2d(chs, stem_channel, 3, 2 if i == 1 else 1, padding=1))
            setattr(self, f"stem_relu{i}", _gelu())
            setattr(self, f"stem_norm{i}", nn.BatchNorm2d(stem_channel))
            chs = stem_channel
        reduction = self.stem_conv1.stride[0]
        self.feature_info = [dict(chs=chs, reduction=reduction, name="stem_norm3")]

        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # linear decay rule
        for i, s in enumerate(_STAGES):
            embed = PatchEmbed(img_size // reduction, chs, embed_dims[i])
            setattr(self, f"patch_embed_{s}", embed)
            reduction *= embed.proj.stride[0]
            n = embed.num_patches
            # MindCV's relative_pos: zeros of (heads, tokens, tokens / sr^2), not a parameter.
            self.register_buffer(f"relative_pos_{s}", torch.zeros(num_heads[i], n, n // sr_ratios[i] ** 2),
                                 persistent=False)
            first = sum(depths[:i])
            setattr(self, f"blocks_{s}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      dpr[first + j], qk_ratio, sr_ratios[i]) for j in range(depths[i])]))
            chs = embed_dims[i]
            self.feature_info.append(dict(chs=chs, reduction=reduction, name=f"blocks_{s}.{depths[i] - 1}"))

        self._fc = nn.Conv2d(chs, fc_dim, 1)
        self._bn = nn.BatchNorm2d(fc_dim)
        self._drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(fc_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, conv=fan_out_normal, linear=trunc_normal(0.02, -2.0, 2.0))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2, 3):
            x = getattr(self, f"stem_norm{i}")(getattr(self, f"stem_relu{i}")(getattr(self, f"stem_conv{i}")(x)))
        return x

    def _stage(self, s: str, x: torch.Tensor) -> torch.Tensor:
        """One stage on an NCHW map: patch embedding and blocks on tokens, returned NCHW."""
        x, grid = getattr(self, f"patch_embed_{s}")(x)
        blocks = getattr(self, f"blocks_{s}")
        rel = relative_pos_for(getattr(self, f"relative_pos_{s}"), grid, blocks[0].attn.kv_grid(grid))
        for blk in blocks:
            x = blk(x, grid, rel)
        return tokens_to_nchw(x, grid)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        x = self._stem(x)
        out = [x] if 0 in take else []
        for i, s in enumerate(_STAGES[:deepest], start=1):
            x = self._stage(s, x)
            if i in take:
                out.append(x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and every stage after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("_fc", "_bn", "_drop", "head"):
            delattr(self, name)
        for s in _STAGES[deepest:]:
            for name in (f"patch_embed_{s}", f"relative_pos_{s}", f"blocks_{s}"):
                delattr(self, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self._bn(self._fc(x)))
        return self.head(self._drop(x.mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cmt(variant: str, pretrained: bool = False, **kwargs) -> CMT:
    return build_model_with_cfg(CMT, pretrained, default_cfg=default_cfgs[variant], **vars(model_cfgs[variant]),
                                **kwargs)


def _cfg(side: int, url: str = ""):
    return dict(url=url, num_classes=1000, input_size=(3, side, side), crop_pct=0.96, interpolation="bicubic",
                first_conv="stem_conv1", classifier="head", fixed_input_size=True,
                size_note=f"MindCV's CMT takes only {side} px (its patch embeddings assert it; its zero relative_pos "
                          f"is shaped for it); featurezoo runs any size, adding no relative position off that grid")


default_cfgs = generate_default_cfgs({
    "cmt_tiny": _cfg(160),
    "cmt_xsmall": _cfg(192),
    "cmt_small": _cfg(224, "https://download.mindspore.cn/toolkits/mindcv/cmt/cmt_small-6858ee22.ckpt"),
    "cmt_base": _cfg(256),
})


@dataclass(frozen=True)
class CMTCfg:
    """A variant: native size, stage widths/depths, MLP ratio and stem width (heads 1, 2, 4, 8; sr 8, 4, 2, 1)."""

    img_size: int
    embed_dims: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]
    mlp_ratios: Tuple[float, float, float, float]
    stem_channel: int


model_cfgs = dict(
    cmt_tiny=CMTCfg(160, (46, 92, 184, 368), (2, 2, 10, 2), (3.6,) * 4, 16),
    cmt_xsmall=CMTCfg(192, (52, 104, 208, 416), (3, 3, 12, 3), (3.8,) * 4, 16),
    cmt_small=CMTCfg(224, (64, 128, 256, 512), (3, 3, 16, 3), (4.0,) * 4, 32),
    cmt_base=CMTCfg(256, (76, 152, 304, 608), (4, 4, 20, 4), (4.0,) * 4, 38),
)


@register_model
def cmt_tiny(pretrained: bool = False, **kwargs) -> CMT:
    return _create_cmt("cmt_tiny", pretrained, **kwargs)


@register_model
def cmt_xsmall(pretrained: bool = False, **kwargs) -> CMT:
    return _create_cmt("cmt_xsmall", pretrained, **kwargs)


@register_model
def cmt_small(pretrained: bool = False, **kwargs) -> CMT:
    return _create_cmt("cmt_small", pretrained, **kwargs)


@register_model
def cmt_base(pretrained: bool = False, **kwargs) -> CMT:
    return _create_cmt("cmt_base", pretrained, **kwargs)
