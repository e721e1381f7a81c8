"""CaiT (Class-Attention in Image Transformers), with MindCV's module tree and parameter names.

`Going deeper with Image Transformers <https://arxiv.org/abs/2103.17239>`_. An
unpadded patch conv (k = s = 16), a learned position embedding for the patch
tokens only (no class-token slot), ``depth`` pre-norm self-attention blocks
(``blocks``) with talking heads (``proj_l`` mixes the heads' logits before the
softmax, ``proj_w`` the probabilities after it) and per-channel layer scales
``gamma_1`` / ``gamma_2``; then the class token joins in the 2
class-attention blocks (``blocks_token_only``), whose single query is the class
token and which update only it; a final LayerNorm and a linear head on the
class token.

MindCV details kept here (and where timm's ``cait_*`` differ): no bias on
``qkv``, on the self-attention ``proj``, on ``proj_l`` / ``proj_w`` or on the
class-attention ``q`` / ``k`` / ``v`` (timm has all of them; the
class-attention ``proj`` has one in both), GELU is MindSpore's default tanh
approximation (timm: exact). LayerNorm eps 1e-6 in both. So timm's CaiT is no weight twin:
it has more parameters. ``tests/test_cait.py`` checks that, with timm's extra
biases set to zero and its GELU made tanh, timm computes our function.

``feature_info``: one entry per self-attention block, ``blocks.0`` ..
``blocks.{depth-1}``, the patch tokens as a NCHW map at stride 16 (no final
norm, as timm's ``forward_intermediates``), marked ``native=True``; plus the
parameter-free pyramid levels derived from the last block (``native=False``;
see :mod:`featurezoo.layers.plain_pyramid`), so ``out_indices="pyramid"``
gives strides 4/8/16/32. The class-attention blocks change only the class
token, so they are no levels: a feature model drops them with the class
token, the final norm and the head. The patch conv is unpadded, so a map has
``floor(size / 16)`` tokens per side (the cfg's ``valid_padding``).

Input sizes: MindCV runs only at the size the position embedding is learned
for (224, 384 or 448 px by name); here the embedding is resampled bicubically
(timm's rule) to any other grid, non-square included, for the feature model
and the classifier alike, and left untouched at the native grid. Inputs
smaller than the patch raise a ``ValueError``.
"""
from __future__ import annotations

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
from ..layers.tokens import nchw_to_tokens, resample_pos_embed, tokens_to_nchw
from ..registry import register_model
from .vit import Mlp, PatchEmbed, vit_size_facts

__all__ = ["CaiT", "TalkingHeadAttention", "ClassAttention", "LayerScaleBlockSA", "LayerScaleBlockCA"]

_LN_EPS = 1e-6  # every CaiT LayerNorm in MindCV
_PATCH = 16


class TalkingHeadAttention(nn.Module):
    """Self-attention whose per-head logits and probabilities are mixed across heads by the
    bias-free linear maps ``proj_l`` (before the softmax) and ``proj_w`` (after it)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CaiT: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_l = nn.Linear(num_heads, num_heads, bias=False)
        self.proj_w = nn.Linear(num_heads, num_heads, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        # The head mixes act on the heads axis, moved last for the Linear and back.
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.attn_drop(self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class ClassAttention(nn.Module):
    """Attention of the class token (``x[:, 0]``, the only query) over every token; returns the
    class token's update, (B, 1, C)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CaiT: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x[:, :1]).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(b, 1, c)))


class LayerScaleBlockSA(nn.Module):
    """Pre-norm self-attention block with layer scales: ``x + gamma_1 * attn(norm1(x))``,
    ``x + gamma_2 * mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, init_values: float = 1e-4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = TalkingHeadAttention(dim, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class LayerScaleBlockCA(nn.Module):
    """Class-attention block: updates only the class token ``x_cls`` (B, 1, C) from it and the
    patch tokens ``x``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 1e-4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = ClassAttention(dim, num_heads)
        self.drop_path = nn.Identity()  # MindCV builds the class-attention blocks without drop-path
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.drop_path(self.gamma_1 * self.attn(self.norm1(u)))
        return x_cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x_cls)))


class CaiT(nn.Module):
    """CaiT classifier; ``feature_info``: every self-attention block at stride 16 plus the derived
    pyramid levels.

    Args:
        image_size: the input size the position embedding is learned for.
        in_channels, num_classes: input channels, classifier outputs (0: no head).
        embed_dim, depth, num_heads, mlp_ratio: the self-attention blocks' shape.
        init_values: the layer scales' initial value.
        depth_token_only: the number of class-attention blocks (MLP ratio ``mlp_ratio`` too, as in
            MindCV, which ignores its own ``mlp_ratio_clstk``).
        drop_rate, attn_drop_rate, drop_path_rate: dropout after the position embedding and in the
            self-attention blocks, on their attention, stochastic depth (the same in every block,
            as MindCV).
    """

    def __init__(self, image_size: int = 224, in_channels: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, init_values: float = 1e-4,
                 depth_token_only: int = 2, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_classes: int = 1000):
        super().__init__()
        self.patch_embed = PatchEmbed(_PATCH, in_channels, embed_dim)
        self.pos_grid = (image_size // _PATCH, image_size // _PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            LayerScaleBlockSA(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate,
                              init_values)
            for _ in range(depth)
        ])
        self.blocks_token_only = nn.ModuleList([
            LayerScaleBlockCA(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth_token_only)
        ])
        self.feature_info = plain_feature_info(embed_dim, _PATCH, [f"blocks.{i}" for i in range(depth)])
        self._level_blocks = level_blocks(self.feature_info)
        self.num_features = embed_dim
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense TruncatedNormal(0.02), biases zero; the patch conv TruncatedNormal (0.01);
        # embeddings TruncatedNormal(0.02).
        init_weights(self, conv=trunc_normal(0.01, -2.0, 2.0), linear=trunc_normal(0.02, -2.0, 2.0))
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch tokens with the position embedding added (no class token); the token grid."""
        x = self.patch_embed(x)
        hw = (x.shape[-2], x.shape[-1])
        pos = resample_pos_embed(self.pos_embed, hw, self.pos_grid)
        return self.pos_drop(nchw_to_tokens(x) + pos), hw

    def _run(self, x: torch.Tensor, keep: Sequence[int] = (), last: Optional[int] = None
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """Self-attention blocks 0..``last`` (default: all): the NCHW maps of the blocks in ``keep``,
        and the last tokens."""
        x, hw = self._embed(x)
        maps: Dict[int, torch.Tensor] = {}
        stop = len(self.blocks) if last is None else last + 1
        for i in range(stop):
            x = self.blocks[i](x)
            if i in keep:
                maps[i] = tokens_to_nchw(x, hw)
        return maps, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing no block past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        keep = {self._level_blocks[i] for i in take}
        maps, _ = self._run(x, keep, max(keep))
        return plain_levels(self.feature_info, sorted(take), maps)

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head, the norm, the class token and class-attention blocks, and every block after
        the deepest one the entries ``indices`` need."""
        take, _ = take_levels(indices, len(self.feature_info))
        last = max(self._level_blocks[i] for i in take)
        del self.blocks[last + 1:]
        del self.cls_token, self.blocks_token_only, self.norm, self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token (after the class-attention blocks) and the patch tokens, normalised,
        (B, 1 + H*W, C)."""
        x = self._run(x)[1]
        x_cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            x_cls = blk(x, x_cls)
        return self.norm(torch.cat((x_cls, x), dim=1))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cait(variant: str, pretrained: bool = False, **kwargs) -> CaiT:
    return build_model_with_cfg(CaiT, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def _cfg(variant: str):
    # MindCV publishes no CaiT weights (its default_cfgs' urls are empty).
    return dict(url="", num_classes=1000, first_conv="patch_embed.proj", classifier="head",
                **vit_size_facts(model_cfgs[variant].image_size, _PATCH))


@dataclass(frozen=True)
class CaiTCfg:
    """A variant's shape (see :class:`CaiT`)."""

    image_size: int
    embed_dim: int
    depth: int
    num_heads: int
    init_values: float


model_cfgs = dict(
    cait_xxs24_224=CaiTCfg(224, 192, 24, 4, 1e-5),
    cait_xs24_384=CaiTCfg(384, 288, 24, 6, 1e-5),
    cait_s24_224=CaiTCfg(224, 384, 24, 8, 1e-5),
    cait_s24_384=CaiTCfg(384, 384, 24, 8, 1e-5),
    cait_s36_384=CaiTCfg(384, 384, 36, 8, 1e-6),
    cait_m36_384=CaiTCfg(384, 768, 36, 16, 1e-6),
    cait_m48_448=CaiTCfg(448, 768, 48, 16, 1e-6),
)

# No timm twins: timm's cait_* have biases MindCV's lack (see the module docstring).
default_cfgs = generate_default_cfgs({name: _cfg(name) for name in model_cfgs})


@register_model
def cait_xxs24_224(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_xxs24_224", pretrained, **kwargs)


@register_model
def cait_xs24_384(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_xs24_384", pretrained, **kwargs)


@register_model
def cait_s24_224(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_s24_224", pretrained, **kwargs)


@register_model
def cait_s24_384(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_s24_384", pretrained, **kwargs)


@register_model
def cait_s36_384(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_s36_384", pretrained, **kwargs)


@register_model
def cait_m36_384(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_m36_384", pretrained, **kwargs)


@register_model
def cait_m48_448(pretrained: bool = False, **kwargs) -> CaiT:
    return _create_cait("cait_m48_448", pretrained, **kwargs)
