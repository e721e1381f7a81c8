"""CrossViT, with MindCV's module tree and parameter names.

`CrossViT: Cross-Attention Multi-Scale Vision Transformer <https://arxiv.org/abs/2103.14899>`_.
Two plain ViT branches: a small-patch one (12 px patches of the image resized
to 240 px: a 20x20 token grid) and a large-patch one (16 px patches of the
image resized to 224 px: 14x14). Each of the three ``MultiScaleBlock`` s runs
both branches' transformer blocks (``blocks.{i}.blocks.{d}``), then swaps
information through the class tokens only: each branch's class token is
projected to the other branch's width (``projs``), attends to the other
branch's patch tokens (``fusion``, a one-query cross-attention) and is
projected back (``revert_projs``). Logits are the mean of the two branch heads
on the final-normed class tokens.

MindCV details kept here (timm's ``crossvit_*_240`` twins differ in each):
the branch resize is bilinear with ``align_corners=True`` (timm: bicubic,
``align_corners=False``), GELU is MindSpore's tanh approximation (timm:
exact), the blocks' and fusion LayerNorms use MindSpore's default eps 1e-7
(timm: 1e-6; ``projs``, ``revert_projs`` and the final norms are 1e-6 in
both). MindCV resizes a branch's input when its height differs from the
branch size; here when either side does (the same at every square size; a
non-square input, on which MindCV fails, is resized too).

Sizes. Any input size runs, the classifier included, and the token grids are
fixed: whatever the input, branch 0 gives 20x20 maps and branch 1 14x14, so a
map's stride is ``input / grid`` (12 and 17.14 at 240 px; 11.2 and 16 at
224 px). There is no position embedding to resample and no size to refuse.

``feature_info``: the patch tokens (class token dropped) of both branches after
each multi-scale block, branch-major (branch 0 after blocks 0, 1, 2, then
branch 1 after blocks 0, 1, 2), named ``blocks.{i}.blocks.{d}``: the fusion
changes only class tokens, so a branch's map after block ``i`` is exactly the
output of that module. Each entry carries its fixed ``grid`` (the contract
checks the maps against it at every size) and its ``stage`` (the multi-scale
block, which ``frozen_stages`` counts: block ``i`` of both branches is stage
``i + 1``). The integer ``reduction`` is the stride at the model's native size
(MindCV's cfg: 240 px for crossvit_9, 224 px for crossvit_15/18), rounded:
12 and 17 (exactly 17.14, timm's values) at 240 px, 11 (11.2) and 16 at
224 px. ``out_indices="pyramid"`` is therefore the last map of each branch: no
parameter-free 4/8/16/32 pyramid is derived, because neither branch has a
power-of-two relation to those strides at 240 px (12 px; 17.14 px), and a set
derived from the large branch at 224 px (exactly 16) would sit next to a
small-branch level at 11.2 px and would only be true at that one size.

MindSpore saves the multi-scale blocks under names that are not module paths
(``blocks`` is an empty ``CellList`` filled by ``append``): ``blocks.0.X`` as
``0.X`` and ``blocks.{i}.X`` (i >= 1) as ``0.blocks.0.{i}.X``. The cfg's
``mindcv_renames`` map these onto the module paths; module paths (MindCV's
``parameters_and_names()``, ours) pass unchanged, so both forms load.
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
from ..layers.fx_calls import fx_call
from ..layers.init import he_uniform, init_weights, trunc_normal
from ..layers.tokens import nchw_to_tokens, tokens_to_nchw
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["CrossViT", "MultiScaleBlock", "CrossAttentionBlock", "CrossAttention", "Block", "Attention", "Mlp",
           "PatchEmbed"]

_LN_EPS = 1e-7  # MindSpore's nn.LayerNorm default: the blocks and the fusion
_PROJ_LN_EPS = 1e-6  # projs, revert_projs and the final norms (given explicitly in MindCV)
# The size at which the integer reductions are declared (see the module docstring).
@fx_call
def resize_to_branch(x: torch.Tensor, side: int, mode: str, align_corners: Optional[bool]) -> torch.Tensor:
    """``x`` resized to ``side`` x ``side`` (MindCV's per-branch resize), or ``x`` itself at that size."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode=mode, align_corners=align_corners)


class PatchEmbed(nn.Module):
    """The unpadded patch conv (kernel = stride = ``patch_size``); returns ``(B, H*W, C)`` tokens."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, patch_size, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nchw_to_tokens(self.proj(x))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block of one branch."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """The class token (the first token) attends to every token: one query, ``wq``/``wk``/``wv`` apart."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.wq(x[:, :1]).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, 1, c)))


class CrossAttentionBlock(nn.Module):
    """``cls + cross_attn(norm1(tokens))``: returns the updated class token only, ``(B, 1, C)``
    (MindCV builds these without an MLP)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))


def _projection(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in, eps=_PROJ_LN_EPS), nn.GELU(approximate="tanh"),
                         nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Each branch's transformer blocks (``blocks.{d}``), then the class-token exchange (:meth:`fuse`)."""

    def __init__(self, dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 mlp_ratios: Sequence[float], qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] = (0.0,)):
        super().__init__()
        n = len(dims)
        self.blocks = nn.ModuleList([
            nn.Sequential(*[Block(dims[d], num_heads[d], mlp_ratios[d], qkv_bias, drop, attn_drop, drop_path[k])
                            for k in range(depths[d])])
            for d in range(n)
        ])
        self.projs = nn.ModuleList([_projection(dims[d], dims[(d + 1) % n]) for d in range(n)])
        self.fusion = nn.ModuleList([
            nn.Sequential(CrossAttentionBlock(dims[(d + 1) % n], num_heads[(d + 1) % n], qkv_bias, drop, attn_drop,
                                              drop_path[-1]))
            for d in range(n)
        ])
        self.revert_projs = nn.ModuleList([_projection(dims[(d + 1) % n], dims[d]) for d in range(n)])

    def fuse(self, outs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Branch ``d``'s class token, projected to branch ``d+1``'s width, attends to that branch's patch
        tokens and is projected back; the patch tokens pass unchanged."""
        n = len(outs)
        fused = []
        for d in range(n):
            query = torch.cat((self.projs[d](outs[d][:, :1]), outs[(d + 1) % n][:, 1:]), dim=1)
            cls = self.revert_projs[d](self.fusion[d](query))
            fused.append(torch.cat((cls, outs[d][:, 1:]), dim=1))
        return fused

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        return self.fuse([stack(x) for stack, x in zip(self.blocks, xs)])


class CrossViT(nn.Module):
    """CrossViT classifier; ``feature_info``: both branches' maps after each multi-scale block, branch-major.

    Args:
        branch_sizes: the side each branch resizes its input to (its position embedding's size).
        patch_sizes: each branch's patch conv kernel and stride.
        embed_dims, num_heads, mlp_ratios: per branch.
        depth: per multi-scale block, ``(blocks of branch 0, blocks of branch 1, 0)`` (MindCV's layout; the
            last number, fusion depth, is 0: one cross-attention block per branch).
        in_channels, num_classes: input channels, classifier outputs (0: no heads).
        qkv_bias: biases of ``qkv`` and ``wq``/``wk``/``wv``.
        drop_rate, attn_drop_rate, drop_path_rate: dropout (after the position embedding and in the blocks),
            on attention, stochastic depth (linear over the blocks, as MindCV).
        image_size: the native input side; ``feature_info`` reductions are the strides there, rounded.
    """

    def __init__(self, branch_sizes: Sequence[int] = (240, 224), patch_sizes: Sequence[int] = (12, 16),
                 embed_dims: Sequence[int] = (128, 256),
                 depth: Sequence[Sequence[int]] = ((1, 3, 0), (1, 3, 0), (1, 3, 0)),
                 num_heads: Sequence[int] = (4, 4), mlp_ratios: Sequence[float] = (3.0, 3.0),
                 in_channels: int = 3, num_classes: int = 1000, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, image_size: int = 240):
        super().__init__()
        n = len(patch_sizes)
        if not len(branch_sizes) == len(embed_dims) == len(num_heads) == len(mlp_ratios) == n:
            raise ValueError("CrossViT: branch_sizes, patch_sizes, embed_dims, num_heads and mlp_ratios need one "
                             "value per branch")
        if any(cfg[-1] != 0 for cfg in depth):
            raise ValueError("CrossViT: only MindCV's fusion depth 0 (one cross-attention block) is implemented")
        self.num_branches = n
        self.branch_sizes = tuple(branch_sizes)
        self.grids = tuple((s // p, s // p) for s, p in zip(branch_sizes, patch_sizes))
        # The branch resize (MindCV's); a plain attribute, so a test can swap in timm's.
        self.resize_mode, self.resize_align_corners = "bilinear", True
        self.patch_embed = nn.ModuleList([PatchEmbed(p, in_channels, d) for p, d in zip(patch_sizes, embed_dims)])
        self.pos_embed = nn.ParameterList([torch.zeros(1, 1 + g[0] * g[1], d) for g, d in zip(self.grids, embed_dims)])
        self.cls_token = nn.ParameterList([torch.zeros(1, 1, d) for d in embed_dims])
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(sum(cfg[-2:]) for cfg in depth), device="cpu").tolist()
        self.blocks = nn.ModuleList()
        self.feature_info = []
        start = 0
        for cfg in depth:
            count = max(cfg[:-1]) + cfg[-1]
            self.blocks.append(MultiScaleBlock(embed_dims, cfg[:-1], num_heads, mlp_ratios, qkv_bias, drop_rate,
                                               attn_drop_rate, dpr[start:start + count]))
            start += count
        self._depth = len(self.blocks)  # kept: pruning shortens self.blocks
        # Branch-major: index d * len(depth) + i is branch d after multi-scale block i.
        for d, grid in enumerate(self.grids):
            self.feature_info += [dict(chs=embed_dims[d], reduction=round(image_size / grid[0]),
                                       name=f"blocks.{i}.blocks.{d}", grid=grid, native=True, stage=i + 1)
                                  for i in range(self._depth)]
        self.num_classes = num_classes
        self.num_features = sum(embed_dims)
        self.norm = nn.ModuleList([nn.LayerNorm(d, eps=_PROJ_LN_EPS) for d in embed_dims])
        self.head = nn.ModuleList([nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
                                   for d in embed_dims])
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense TruncatedNormal(0.02), biases zero, LayerNorm ones/zeros; embeddings TruncatedNormal(0.02).
        init_weights(self, conv=he_uniform, linear=trunc_normal(0.02, -2.0, 2.0))
        for p in (*self.pos_embed, *self.cls_token):
            nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)

    def _level(self, i: int) -> Tuple[int, int]:
        """(branch, multi-scale block) of ``feature_info`` entry ``i``."""
        return divmod(i, self._depth)

    def _embed(self, x: torch.Tensor, branches: Sequence[int]) -> List[Optional[torch.Tensor]]:
        """Each branch in ``branches``: the input resized to the branch's size, its patch tokens with the
        class token prepended and the position embedding added (``None`` for the other branches)."""
        xs: List[Optional[torch.Tensor]] = [None] * self.num_branches
        for d in branches:
            s = self.branch_sizes[d]
            t = self.patch_embed[d](resize_to_branch(x, s, self.resize_mode, self.resize_align_corners))
            t = torch.cat((self.cls_token[d].expand(t.shape[0], -1, -1), t), dim=1)
            xs[d] = self.pos_drop(t + self.pos_embed[d])
        return xs

    def _run(self, x: torch.Tensor, take: Optional[Dict[int, Sequence[int]]] = None
             ) -> Tuple[Dict[Tuple[int, int], torch.Tensor], List[torch.Tensor]]:
        """The multi-scale blocks. ``take`` ({block: branches}): keep those branches' NCHW maps and stop at
        the deepest block named, computing there only those branches' blocks (no fusion: it changes only
        class tokens). Returns the maps, keyed (branch, block), and the tokens of a complete run."""
        all_branches = range(self.num_branches)
        last = max(take) if take else self._depth - 1
        xs = self._embed(x, take[0] if take and last == 0 else all_branches)
        maps: Dict[Tuple[int, int], torch.Tensor] = {}
        for i in range(last + 1):
            blk = self.blocks[i]
            stop = take is not None and i == last
            outs = [blk.blocks[d](xs[d]) if (not stop or d in take[i]) else None for d in all_branches]
            for d in (take or {}).get(i, ()):
                maps[(d, i)] = tokens_to_nchw(outs[d][:, 1:], self.grids[d])
            if stop:
                return maps, []
            xs = blk.fuse(outs)
        return maps, xs

    def _take(self, indices: Sequence[int]) -> Dict[int, List[int]]:
        take, _ = take_levels(indices, len(self.feature_info))
        by_block: Dict[int, List[int]] = {}
        for i in sorted(take):
            d, blk = self._level(i)
            by_block.setdefault(blk, []).append(d)
        return by_block

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest block needed
        (and in that block only the branches asked for)."""
        maps, _ = self._run(x, self._take(indices))
        return [maps[self._level(i)] for i in sorted(set(indices))]

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the heads, the final norms, every block after the deepest one needed, that block's fusion
        and its blocks of branches not asked for there (and, at block 0, those branches' embeddings). A
        pruned module is set to ``None`` where deleting it would renumber its siblings."""
        take = self._take(indices)
        last = max(take)
        del self.blocks[last + 1:]
        blk = self.blocks[last]
        del blk.projs, blk.fusion, blk.revert_projs
        for d in range(self.num_branches):
            if d not in take[last]:
                blk.blocks[d] = None
                if last == 0:
                    self.patch_embed[d] = None
                    self.pos_embed[d] = None
                    self.cls_token[d] = None
        del self.norm, self.head

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Each branch's tokens after the blocks and its final norm, ``(B, 1 + H*W, C)``."""
        return [norm(t) for norm, t in zip(self.norm, self._run(x)[1])]

    def forward_head(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """The mean of the branch heads on the class tokens (without heads: the class tokens concatenated,
        ``num_features`` wide, as timm)."""
        if self.num_classes == 0:
            return torch.cat([t[:, 0] for t in xs], dim=1)
        return torch.stack([head(t[:, 0]) for head, t in zip(self.head, xs)]).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_crossvit(variant: str, pretrained: bool = False, **kwargs) -> CrossViT:
    c = model_cfgs[variant]
    return build_model_with_cfg(CrossViT, pretrained, default_cfg=default_cfgs[variant], embed_dims=c.embed_dims,
                                depth=((1, c.depth, 0),) * 3, num_heads=(c.num_heads,) * 2,
                                image_size=default_cfgs[variant].input_size[-1], **kwargs)


# MindSpore's saved names (see the module docstring) -> module paths; module paths pass unchanged.
_MINDCV_RENAMES = (
    (r"^0\.blocks\.0\.([1-9]\d*)\.(blocks|projs|fusion|revert_projs)\.", r"blocks.\1.\2."),
    (r"^0\.(blocks|projs|fusion|revert_projs)\.", r"blocks.0.\1."),
)

# timm's crossvit_*_240: the embeddings are pos_embed_{d} / cls_token_{d}, and with fusion depth 0 the
# cross-attention block is fusion.{d} itself rather than inside a Sequential.
_TIMM_RENAMES = (
    (r"^(pos_embed|cls_token)_(\d+)$", r"\1.\2"),
    (r"^(blocks\.\d+\.fusion\.\d+)\.", r"\1.0."),
)
_TIMM_TWINS = {"crossvit_9": "crossvit_9_240", "crossvit_15": "crossvit_15_240", "crossvit_18": "crossvit_18_240"}

_SIZE_NOTE = ("any input size runs (classifier and features): each branch resizes the input (bilinear, "
              "align_corners=True, as MindCV) to its own size, 240 px for the 12-px-patch branch and 224 px for the "
              "16-px one, so the maps are always 20x20 and 14x14 (each feature_info entry's 'grid') and a map's "
              "stride is input / grid; the declared reductions are the strides at the native size, rounded")


def _cfg(url: str, side: int):
    return dict(url=url, num_classes=1000, input_size=(3, side, side), first_conv="patch_embed.0.proj",
                classifier="head.0,head.1", size_note=_SIZE_NOTE)


_MS = "https://download.mindspore.cn/toolkits/mindcv/crossvit"

default_cfgs = generate_default_cfgs({
    "crossvit_9": _cfg(f"{_MS}/crossvit_9-e74c8e18.ckpt", 240),
    "crossvit_15": _cfg(f"{_MS}/crossvit_15-eaa43c02.ckpt", 224),
    "crossvit_18": _cfg(f"{_MS}/crossvit_18-ca0a2e43.ckpt", 224),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES, mindcv_renames=_MINDCV_RENAMES)


@dataclass(frozen=True)
class CrossViTCfg:
    """A variant's shape: per-branch widths, the large branch's blocks per multi-scale block, heads."""

    embed_dims: Tuple[int, int]
    depth: int
    num_heads: int


model_cfgs = dict(
    crossvit_9=CrossViTCfg((128, 256), 3, 4),
    crossvit_15=CrossViTCfg((192, 384), 5, 6),
    crossvit_18=CrossViTCfg((224, 448), 6, 7),
)


@register_model
def crossvit_9(pretrained: bool = False, **kwargs) -> CrossViT:
    return _create_crossvit("crossvit_9", pretrained, **kwargs)


@register_model
def crossvit_15(pretrained: bool = False, **kwargs) -> CrossViT:
    return _create_crossvit("crossvit_15", pretrained, **kwargs)


@register_model
def crossvit_18(pretrained: bool = False, **kwargs) -> CrossViT:
    return _create_crossvit("crossvit_18", pretrained, **kwargs)
