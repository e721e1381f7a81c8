"""XCiT (Cross-Covariance Image Transformer), with MindCV's module tree and parameter names.

`XCiT: Cross-Covariance Image Transformers <https://arxiv.org/abs/2106.09681>`_.
A convolutional patch embedding (``patch_embed.proj``: 3x3 stride-2 conv + BN,
GELU, repeated until the patch stride: four convs for patch 16, widths
``embed_dim`` / 8, / 4, / 2, / 1), a Fourier position encoding computed for
whatever token grid the input gives (``pos_embeder``: sine/cosine features of
the normalised row and column, projected by a 1x1 conv), ``depth`` XCA blocks
at the patch stride, each cross-covariance attention (a ``head_dim`` x
``head_dim`` attention over channels, scaled by a learned per-head
``temperature``), then local patch interaction (``local_mp``: depthwise 3x3
conv, GELU, BN, depthwise 3x3 conv on the token grid) and an MLP, each
residual scaled by ``gamma1`` / ``gamma3`` / ``gamma2``. The class token joins
only for the 2 class-attention blocks (``cls_attn_blocks``), which update only
it; a final LayerNorm and a linear head on the class token.

MindCV details kept here (and where timm's ``xcit_tiny_12_p16_224``, which
holds the same weights, differs): MindCV's XCA does **not** L2-normalise q and
k over the tokens before ``q k^T`` (timm does, as the paper), and every GELU
is MindSpore's default tanh approximation (timm: exact). LayerNorm eps 1e-6
and BatchNorm eps 1e-5 in both. timm's class attention keeps separate ``q``,
``k``, ``v`` projections where MindCV has one ``qkv`` (fused on loading), and
calls the position encoding ``pos_embed``. ``tests/test_xcit.py`` swaps both
differences into timm and requires timm's outputs.

``feature_info``: the stem's real maps first, the GELU outputs
``patch_embed.proj.1`` / ``.3`` / ``.5`` (24 @ 2, 48 @ 4, 96 @ 8 for the tiny
model); then one entry per XCA block, ``blocks.0`` .. ``blocks.{depth-1}``
(192 @ 16, the tokens as a NCHW map, no final norm), and the parameter-free
levels derived from the last block (``native=False``: x4 / x2 bilinear up, 2x2
max pool down; see :mod:`featurezoo.layers.plain_pyramid`)::

    0  patch_embed.proj.1  24 @ 2     3..13  blocks.0 .. blocks.10  192 @ 16
    1  patch_embed.proj.3  48 @ 4     14     blocks.11@4            192 @ 4   derived
    2  patch_embed.proj.5  96 @ 8     15     blocks.11@8            192 @ 8   derived
                                      16     blocks.11              192 @ 16
                                      17     blocks.11@32           192 @ 32  derived

``out_indices="pyramid"`` (the last entry at each reduction) is therefore
``[0, 14, 15, 16, 17]``: the stem's stride-2 map, the stride-4 and -8 maps
derived from the last block, the last block, its stride-32 pool. The stem's
own stride-4/8 maps are entries 1 and 2. The class-attention blocks change
only the class token, so they are no levels: a feature model drops them with
the class token, the final norm and the head.

Input sizes: every conv pads, so a stride-``r`` map has ``ceil(size / r)``
rows and columns, as in a CNN; the derived finer levels (4 and 2 times the
stride-16 grid) are cropped to that too, which removes only rows and columns
past the image (none when the size is a multiple of 16). The position
encoding is computed for the grid the input gives, so the classifier runs at
any size too, as in MindCV.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.init import init_weights, trunc_normal
from ..layers.plain_pyramid import level_blocks, plain_feature_info, plain_levels
from ..layers.tokens import nchw_to_tokens, tokens_to_nchw
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["XCiT", "XCA", "XCABlock", "LPI", "ClassAttention", "ClassAttentionBlock", "ConvPatchEmbed",
           "PositionalEncodingFourier"]

_LN_EPS = 1e-6  # MindCV's xcit builder: LayerNorm(epsilon=1e-6)
_GELU = "tanh"  # MindSpore's nn.GELU() default


def _conv3x3_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 2, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels))


class ConvPatchEmbed(nn.Module):
    """Stride-2 3x3 conv + BN layers, GELU between them, down to the patch stride (8 or 16).

    ``levels``: ``(index in proj, channels, stride)`` of each GELU output (the stem's feature maps).
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f"XCiT: the convolutional patch embedding needs patch_size 8 or 16, got {patch_size}")
        num_convs = patch_size.bit_length() - 1
        layers: List[nn.Module] = []
        self.levels: List[Tuple[int, int, int]] = []
        chs = in_channels
        for i in range(num_convs):
            out = embed_dim // 2 ** (num_convs - 1 - i)
            layers.append(_conv3x3_bn(chs, out))
            if i < num_convs - 1:
                layers.append(nn.GELU(approximate=_GELU))
                self.levels.append((len(layers) - 1, out, 2 ** (i + 1)))
            chs = out
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, keep: Sequence[int] = (), stop: Optional[int] = None
                ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """The NCHW map after ``proj`` (or after ``proj[stop]``), and the outputs of the layers ``keep``."""
        maps: Dict[int, torch.Tensor] = {}
        for j, layer in enumerate(self.proj):
            x = layer(x)
            if j in keep:
                maps[j] = x
            if j == stop:
                break
        return x, maps


class PositionalEncodingFourier(nn.Module):
    """DETR's sine/cosine encoding of the normalised row and column (``hidden_dim`` features each),
    projected to ``dim`` by a 1x1 conv; computed for any grid."""

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim
        self.eps = 1e-6

    def _axis(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, hidden_dim): sin of the even, cos of the odd frequencies, interleaved."""
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device)
        pos = pos / (pos[-1:] + self.eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos = pos[:, None] / dim_t
        return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)

    def forward(self, hw: Tuple[int, int]) -> torch.Tensor:
        """(1, dim, H, W)."""
        h, w = hw
        weight = self.token_projection.weight
        pos_y = self._axis(h, weight.device)[:, None, :].expand(h, w, self.hidden_dim)
        pos_x = self._axis(w, weight.device)[None, :, :].expand(h, w, self.hidden_dim)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).unsqueeze(0)
        return self.token_projection(pos.to(weight.dtype))


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv, GELU, BN, depthwise 3x3 conv on the token grid."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = nn.GELU(approximate=_GELU)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(b, c, n).transpose(1, 2)


class XCA(nn.Module):
    """Cross-covariance attention: per head, ``softmax(q^T k * temperature)`` (head_dim x head_dim,
    over the tokens) mixes the channels of v. MindCV's q and k are not L2-normalised (the paper's are)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"XCiT: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (3, B, heads, head_dim, N): channels attend to channels.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1))
        x = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class XCABlock(nn.Module):
    """``x + gamma1 * XCA(norm1(x))``, ``x + gamma3 * LPI(norm3(x))``, ``x + gamma2 * MLP(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, eta: float = 1.0, norm_eps: float = _LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = XCA(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.local_mp = LPI(dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(eta)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(eta)))
        self.gamma3 = nn.Parameter(torch.full((dim,), float(eta)))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma3 * self.local_mp(self.norm3(x), hw))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """CaiT's class attention with a fused ``qkv``: the class token (index 0) is the only query;
    returns the projected class token followed by the other input tokens unchanged."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        cls = F.scaled_dot_product_attention(q[:, :, :1], k, v, dropout_p=self.attn_drop if self.training else 0.0)
        cls = self.proj_drop(self.proj(cls.transpose(1, 2).reshape(b, 1, c)))
        return torch.cat((cls, x[:, 1:]), dim=1)


class ClassAttentionBlock(nn.Module):
    """Updates the class token only: ``x + gamma1 * CA(norm1(x))`` (the other tokens get ``norm1(x)``
    added, as in MindCV and timm), then ``norm2`` (of every token with ``tokens_norm``, else of the class
    token) and ``+ gamma2 * MLP`` of the class token."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, eta: float = 1.0, tokens_norm: bool = False, norm_eps: float = _LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(eta)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(eta)))
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma1 * self.attn(self.norm1(x))
        x = self.norm2(x) if self.tokens_norm else torch.cat((self.norm2(x[:, :1]), x[:, 1:]), dim=1)
        cls = self.gamma2 * self.mlp(x[:, :1])
        return x + torch.cat((cls, x[:, 1:]), dim=1)


class XCiT(nn.Module):
    """XCiT classifier; ``feature_info``: the stem's maps, every XCA block, the derived pyramid levels.

    Args:
        patch_size: 16 (four stem convs) or 8 (three).
        in_channels, num_classes: input channels, classifier outputs (0: no head).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the XCA blocks' shape.
        cls_attn_layers: number of class-attention blocks.
        eta: initial value of the layer scales ``gamma*``.
        tokens_norm: the class-attention blocks' ``norm2`` normalises every token (else the class token).
        norm_eps: every LayerNorm's eps.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after the position encoding and in the
            blocks, on attention, stochastic depth (the same rate in every XCA block, as MindCV).
    """

    def __init__(self, patch_size: int = 16, in_channels: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, cls_attn_layers: int = 2,
                 eta: float = 1.0, tokens_norm: bool = False, norm_eps: float = _LN_EPS, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_classes: int = 1000):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = ConvPatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            XCABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, eta,
                     norm_eps)
            for _ in range(depth)
        ])
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, eta, tokens_norm,
                                norm_eps)
            for _ in range(cls_attn_layers)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pos_embeder = PositionalEncodingFourier(dim=embed_dim)
        self.num_features = embed_dim

        # The stem's maps, then the blocks with the derived pyramid levels.
        self._stem_layers = [j for j, _, _ in self.patch_embed.levels]
        stem_info = [dict(chs=chs, reduction=r, name=f"patch_embed.proj.{j}", native=True)
                     for j, chs, r in self.patch_embed.levels]
        self._plain_info = plain_feature_info(embed_dim, patch_size, [f"blocks.{i}" for i in range(depth)])
        self._level_blocks = level_blocks(self._plain_info)
        self.feature_info = stem_info + self._plain_info
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense TruncatedNormal(0.02) with zero bias; convs MindSpore's default (PyTorch's own);
        # LayerNorm 1 / 0; the class token TruncatedNormal(0.02).
        init_weights(self, linear=trunc_normal(0.02, -2.0, 2.0))
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)

    def _run(self, x: torch.Tensor, stem_keep: Sequence[int] = (), block_keep: Sequence[int] = (),
             last_block: Optional[int] = None, stem_only: bool = False
             ) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor], Optional[torch.Tensor]]:
        """The stem maps ``stem_keep`` (``proj`` indices), then (unless ``stem_only``) blocks 0..``last_block``
        (default: all): the NCHW maps of the blocks ``block_keep`` and the last tokens."""
        x, stem_maps = self.patch_embed(x, stem_keep, max(stem_keep) if stem_only else None)
        if stem_only:
            return stem_maps, {}, None
        hw = (x.shape[-2], x.shape[-1])
        x = self.pos_drop(nchw_to_tokens(x + self.pos_embeder(hw)))
        maps: Dict[int, torch.Tensor] = {}
        stop = len(self.blocks) if last_block is None else last_block + 1
        for i in range(stop):
            x = self.blocks[i](x, hw)
            if i in block_keep:
                maps[i] = tokens_to_nchw(x, hw)
        return stem_maps, maps, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        n_stem = len(self._stem_layers)
        stem_keep = {self._stem_layers[i] for i in take if i < n_stem}
        plain = sorted(i - n_stem for i in take if i >= n_stem)
        if not plain:
            stem_maps, _, _ = self._run(x, stem_keep, stem_only=True)
            return [stem_maps[j] for j in sorted(stem_keep)]
        keep = {self._level_blocks[i] for i in plain}
        stem_maps, maps, _ = self._run(x, stem_keep, keep, max(keep))
        outs = [stem_maps[j] for j in sorted(stem_keep)]
        h, w = x.shape[-2:]
        for i, out in zip(plain, plain_levels(self._plain_info, plain, maps)):
            r = self._plain_info[i]["reduction"]
            if r < self.patch_size:  # the derived finer levels: only what lies on the image, as the stem's maps
                out = out[..., :-(-h // r), :-(-w // r)].contiguous()
            outs.append(out)
        return outs

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the class token, the class-attention blocks, the norm, the head and every layer after the
        deepest the entries ``indices`` need."""
        take, deepest = take_levels(indices, len(self.feature_info))
        del self.cls_token, self.cls_attn_blocks, self.norm, self.head
        n_stem = len(self._stem_layers)
        if deepest < n_stem:
            del self.patch_embed.proj[self._stem_layers[deepest] + 1:]
            del self.blocks, self.pos_embeder, self.pos_drop
            return
        del self.blocks[max(self._level_blocks[i - n_stem] for i in take if i >= n_stem) + 1:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the class-attention blocks and the final norm, (B, 1 + H*W, C), class token first."""
        x = self._run(x)[2]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_xcit(variant: str, pretrained: bool = False, **kwargs) -> XCiT:
    return build_model_with_cfg(XCiT, pretrained, default_cfg=default_cfgs[variant], **vars(model_cfgs[variant]),
                                **kwargs)


_CLS_QKV = re.compile(r"^(cls_attn_blocks\.\d+\.attn\.)([qkv])\.(weight|bias)$")


def _from_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's XCiT state dict under our names: ``pos_embed.`` is ``pos_embeder.``, and each class-attention
    block's separate ``q``/``k``/``v`` are concatenated into MindCV's ``qkv`` (weight and bias); a
    ``q``/``k``/``v`` without its two siblings keeps timm's name (the loader reports it)."""
    out: Dict[str, torch.Tensor] = {}
    parts: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    for name, t in state_dict.items():
        m = _CLS_QKV.match(name)
        if m:
            fused = f"{m[1]}qkv.{m[3]}"
            parts.setdefault(fused, {})[m[2]] = (name, t)
            out.setdefault(fused, t)  # a placeholder keeping the order; replaced below
            continue
        out[re.sub(r"^pos_embed\.", "pos_embeder.", name)] = t
    for fused, got in parts.items():
        if set(got) == set("qkv"):
            out[fused] = torch.cat([got[p][1] for p in "qkv"], dim=0)
        else:
            del out[fused]
            out.update(dict(got.values()))
    return out


def _cfg(url: str = ""):
    # MindCV's default_cfgs give only the URL: the preprocessing defaults are featurezoo's (and MindCV's).
    return dict(url=url, num_classes=1000, first_conv="patch_embed.proj.0.0", classifier="head")


@dataclass(frozen=True)
class XCiTCfg:
    """A variant's shape (see :class:`XCiT`)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    eta: float = 1.0
    tokens_norm: bool = True


model_cfgs = dict(
    xcit_tiny_12_p16_224=XCiTCfg(16, 192, 12, 4),
)

default_cfgs = generate_default_cfgs({
    "xcit_tiny_12_p16_224": _cfg("https://download.mindspore.cn/toolkits/mindcv/xcit/xcit_tiny_12_p16_224-1b1c9301.ckpt"),
}, timm_twins={"xcit_tiny_12_p16_224": "xcit_tiny_12_p16_224"}, timm_convert=_from_timm)


@register_model
def xcit_tiny_12_p16_224(pretrained: bool = False, **kwargs) -> XCiT:
    return _create_xcit("xcit_tiny_12_p16_224", pretrained, **kwargs)
