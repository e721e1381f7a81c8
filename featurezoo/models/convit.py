"""ConViT, with MindCV's module tree and parameter names.

`ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases
<https://arxiv.org/abs/2103.10697>`_. A ViT whose first ``local_up_to_layer``
(10) blocks use gated positional self-attention (GPSA): each head mixes, by a
learned gate ``sigmoid(gating_param)``, the softmax of the content scores
``q k^T / sqrt(d)`` with the softmax of a positional score
``pos_proj(rel_indices)``, where ``rel_indices[p, q] = (dx, dy, dx² + dy²)``
is the offset between the patches ``p`` and ``q`` on the token grid. The last
blocks are plain multi-head self-attention (MHSA). The class token joins only
before block ``local_up_to_layer``; the position embedding (no class-token
slot) is added to the patch tokens. A final LayerNorm and a linear
``classifier`` act on the class token.

MindCV details kept here (and where timm's ``convit_*`` twins differ):
LayerNorm eps 1e-7 (MindSpore's default; timm 1e-6), GELU is MindSpore's
default tanh approximation (timm: exact); q, k and v are three ``Dense``
layers (timm fuses GPSA's ``qk`` and MHSA's ``qkv``: :func:`_from_timm`
splits them); the classifier is ``classifier`` (timm ``head``). timm also
divides GPSA's gated mix by its row sums, which are 1 (a convex mix of two
softmaxes): a float32 rounding difference only. MHSA runs as
``F.scaled_dot_product_attention`` (the same function as MindCV's
``softmax(q k^T * head_dim^-0.5) v``); GPSA, which mixes two softmaxes, is
written out.

``feature_info``: one entry per block, ``blocks.0`` .. ``blocks.11``, the
patch tokens after the block (the class token, present from block
``local_up_to_layer`` on, dropped; no final norm, as timm's
``forward_intermediates``) as a NCHW map at the patch stride (16), marked
``native=True``; plus the parameter-free pyramid levels derived from the last
block (``native=False``; see :mod:`featurezoo.layers.plain_pyramid`), so
``out_indices="pyramid"`` gives strides 4/8/16/32. The patch conv is
unpadded: ``floor(size / 16)`` tokens per side.

Input sizes: MindCV builds ``rel_indices`` for 196 patches and its position
embedding for the 14x14 grid, so it runs only at 224 px. Here both follow the
grid asked: the position embedding is resampled bicubically (timm's rule) and
the relative indices are computed for that grid, non-square included (the
native 14x14 indices are a non-persistent buffer, as MindCV's checkpoint does
not store them; another grid's are kept for the last size seen). The native
size is bit-identical to the parity path. Inputs smaller than the patch raise
a ``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.constants import cacheable
from ..layers.drop_path import DropPath
from ..layers.init import init_weights, trunc_normal
from ..layers.plain_pyramid import level_blocks, plain_feature_info, plain_levels
from ..layers.tokens import nchw_to_tokens, resample_pos_embed, tokens_to_nchw
from ..registry import register_model
from .vit import Mlp, PatchEmbed, vit_size_facts

__all__ = ["ConViT", "Block", "GPSA", "MHSA", "rel_indices"]

_LN_EPS = 1e-7  # MindSpore's nn.LayerNorm default


def rel_indices(grid: Sequence[int], device: Optional[torch.device] = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(1, N, N, 3)``: for the patches ``p``, ``q`` of a row-major ``H x W`` grid (``N = H*W``),
    ``(dx, dy, dx² + dy²)`` with ``dx = col(q) - col(p)``, ``dy = row(q) - row(p)`` (MindCV's
    ``get_rel_indices`` for a square grid).

    >>> rel_indices((1, 2))[0, 0].tolist()
    [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    """
    h, w = int(grid[0]), int(grid[1])
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    return torch.stack((dx, dy, dx * dx + dy * dy), dim=-1).unsqueeze(0).to(dtype)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


class GPSA(nn.Module):
    """Gated positional self-attention: ``((1 - g) softmax(q k^T * scale) + g softmax(pos)) v``,
    ``g = sigmoid(gating_param)`` per head, ``pos = pos_proj(rel_indices)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    def forward(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, N, C)`` patch tokens; ``rel``: their ``(1, N, N, 3)`` :func:`rel_indices`."""
        b, n, c = x.shape
        if rel.shape[1] != n:
            raise ValueError(f"GPSA: {n} tokens but relative indices for {rel.shape[1]}")
        q, k, v = (_split_heads(lin(x), self.num_heads) for lin in (self.q, self.k, self.v))
        pos_score = self.pos_proj(rel).permute(0, 3, 1, 2).softmax(dim=-1)
        patch_score = (torch.matmul(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        gating = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        attn = self.attn_drop((1.0 - gating) * patch_score + gating * pos_score)
        x = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class MHSA(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` projections, scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rel: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (_split_heads(lin(x), self.num_heads) for lin in (self.q, self.k, self.v))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm block, ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, with GPSA or MHSA attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, use_gpsa: bool = True,
                 norm_eps: float = _LN_EPS, gelu_approximate: str = "tanh"):
        super().__init__()
        self.use_gpsa = use_gpsa
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = (GPSA if use_gpsa else MHSA)(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, gelu_approximate)

    def forward(self, x: torch.Tensor, rel: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rel))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(nn.Module):
    """ConViT classifier; ``feature_info``: every block at the patch stride plus the derived pyramid levels.

    Args:
        in_channels, num_classes: input channels, classifier outputs (0: no head).
        image_size: the input size the position embedding and ``rel_indices`` buffer are built for.
        patch_size: the patch conv's kernel and stride (the blocks' stride).
        embed_dim, num_heads, depth, mlp_ratio, qkv_bias: the blocks' shape.
        local_up_to_layer: the number of GPSA blocks; the class token joins before the next one.
        use_pos_embed: add a learned position embedding to the patch tokens.
        locality_strength: scale of the GPSA positional init (MindCV's local init).
        norm_eps: every LayerNorm's eps (MindSpore's default 1e-7).
        gelu_approximate: ``"tanh"`` (MindSpore's default GELU) or ``"none"`` (exact).
        drop_rate, attn_drop_rate, drop_path_rate: dropout after the position embedding and in the
            blocks, on attention, stochastic depth (linear up to ``drop_path_rate``; MindCV's default 0.1).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, image_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 48, num_heads: int = 12, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 depth: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False, attn_drop_rate: float = 0.0,
                 local_up_to_layer: int = 10, use_pos_embed: bool = True, locality_strength: float = 1.0,
                 norm_eps: float = _LN_EPS, gelu_approximate: str = "tanh"):
        super().__init__()
        self.local_up_to_layer = local_up_to_layer
        self.use_pos_embed = use_pos_embed
        self.num_heads = num_heads
        self.locality_strength = locality_strength
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.pos_grid = (image_size // patch_size, image_size // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        # MindCV's GPSA keeps these indices as a plain attribute, so its checkpoints do not store them.
        self.register_buffer("rel_indices", rel_indices(self.pos_grid), persistent=False)
        self._rel_cache: Dict[tuple, torch.Tensor] = {}  # one other grid's indices
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                  use_gpsa=i < local_up_to_layer, norm_eps=norm_eps, gelu_approximate=gelu_approximate)
            for i in range(depth)
        ])
        self.feature_info = plain_feature_info(embed_dim, patch_size, [f"blocks.{i}" for i in range(depth)])
        self._level_blocks = level_blocks(self.feature_info)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense TruncatedNormal(0.02), biases zero; the patch conv TruncatedNormal (0.01);
        # embeddings TruncatedNormal(0.02); then the GPSA local init: v = identity, and pos_proj makes head
        # (h1, h2) of a sqrt(heads)-sided kernel attend around the offset (h1, h2) from its centre.
        init_weights(self, conv=trunc_normal(0.01, -2.0, 2.0), linear=trunc_normal(0.02, -2.0, 2.0))
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        if self.use_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        kernel = int(self.num_heads ** 0.5)
        center = (kernel - 1) / 2 if kernel % 2 == 0 else kernel // 2
        for blk in self.blocks[:self.local_up_to_layer]:
            blk.attn.v.weight.copy_(torch.eye(self.embed_dim))
            w = blk.attn.pos_proj.weight
            for h1 in range(kernel):
                for h2 in range(kernel):
                    w[h1 + kernel * h2] = torch.tensor([2 * (h2 - center), 2 * (h1 - center), -1.0])
            w.mul_(self.locality_strength)

    def _rel_indices_for(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The :func:`rel_indices` of the token grid ``hw``: the buffer at the native grid, else built
        (and kept for the next call at the same grid, device and dtype)."""
        if hw == self.pos_grid:
            return self.rel_indices
        key = (hw, self.rel_indices.device, self.rel_indices.dtype)
        if key not in self._rel_cache:
            built = rel_indices(hw, self.rel_indices.device, self.rel_indices.dtype)
            if not cacheable(built):  # a fake tensor from torch.export / torch.compile: never kept
                return built
            self._rel_cache.clear()
            self._rel_cache[key] = built
        return self._rel_cache[key]

    def _run(self, x: torch.Tensor, keep: Sequence[int] = (), last: Optional[int] = None
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """Blocks 0..``last`` (default: all): the NCHW maps of the blocks in ``keep``, and the last tokens."""
        x = self.patch_embed(x)
        hw = (x.shape[-2], x.shape[-1])
        x = nchw_to_tokens(x)
        if self.use_pos_embed:
            x = x + resample_pos_embed(self.pos_embed, hw, self.pos_grid)
        x = self.pos_drop(x)
        stop = len(self.blocks) if last is None else last + 1
        rel = self._rel_indices_for(hw) if min(stop, self.local_up_to_layer) > 0 else None
        maps: Dict[int, torch.Tensor] = {}
        for i in range(stop):
            if i == self.local_up_to_layer:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = self.blocks[i](x, rel)
            if i in keep:
                maps[i] = tokens_to_nchw(x[:, 1:] if i >= self.local_up_to_layer else x, hw)
        return maps, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing no block past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        keep = {self._level_blocks[i] for i in take}
        maps, _ = self._run(x, keep, max(keep))
        return plain_levels(self.feature_info, sorted(take), maps)

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head, the final norm, every block after the deepest one the entries ``indices`` need,
        and the class token if it would join after that block."""
        take, _ = take_levels(indices, len(self.feature_info))
        last = max(self._level_blocks[i] for i in take)
        del self.blocks[last + 1:]
        del self.norm, self.classifier
        if last < self.local_up_to_layer:
            del self.cls_token

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the blocks and the final norm, (B, C)."""
        return self.norm(self._run(x)[1])[:, 0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_convit(variant: str, pretrained: bool = False, **kwargs) -> ConViT:
    c = model_cfgs[variant]
    return build_model_with_cfg(ConViT, pretrained, default_cfg=default_cfgs[variant], embed_dim=c.embed_dim,
                                num_heads=c.num_heads, **kwargs)


def _cfg(url: str) -> dict:
    facts = vit_size_facts(224, 16)
    facts["size_note"] = ("MindCV builds its position embedding and GPSA relative indices for the 14x14 token grid "
                          "of 224 px and runs only there; featurezoo resamples the embedding bicubically and builds "
                          "the indices for other grids (inputs of at least the 16-px patch)")
    return dict(url=url, num_classes=1000, first_conv="patch_embed.proj", classifier="classifier", **facts)


def _from_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's ConViT state dict under our names: GPSA's fused ``attn.qk`` and MHSA's ``attn.qkv`` split
    into ``attn.q``, ``attn.k`` (, ``attn.v``), and ``head`` is ``classifier``."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name.startswith("head."):
            name = "classifier." + name[len("head."):]
        for fused in ("qkv", "qk"):
            if f".attn.{fused}." in name:
                for part, chunk in zip(fused, t.chunk(len(fused), dim=0)):
                    out[name.replace(f".attn.{fused}.", f".attn.{part}.")] = chunk.clone()
                break
        else:
            out[name] = t
    return out


@dataclass(frozen=True)
class ConViTCfg:
    """A variant's shape (see :class:`ConViT`; every variant: 224 px, patch 16, 12 blocks, 10 of them GPSA)."""

    embed_dim: int
    num_heads: int


model_cfgs = dict(
    convit_tiny=ConViTCfg(192, 4),
    convit_tiny_plus=ConViTCfg(256, 4),
    convit_small=ConViTCfg(432, 9),
    convit_small_plus=ConViTCfg(576, 9),
    convit_base=ConViTCfg(768, 16),
    convit_base_plus=ConViTCfg(1024, 16),
)

_MS = "https://download.mindspore.cn/toolkits/mindcv/convit"

# timm has no "plus" variants.
_TIMM_TWINS = {"convit_tiny": "convit_tiny", "convit_small": "convit_small", "convit_base": "convit_base"}

default_cfgs = generate_default_cfgs({
    "convit_tiny": _cfg(f"{_MS}/convit_tiny-e31023f2.ckpt"),
    "convit_tiny_plus": _cfg(f"{_MS}/convit_tiny_plus-e9d7fb92.ckpt"),
    "convit_small": _cfg(f"{_MS}/convit_small-ba858604.ckpt"),
    "convit_small_plus": _cfg(f"{_MS}/convit_small_plus-2352b9f7.ckpt"),
    "convit_base": _cfg(f"{_MS}/convit_base-c61b808c.ckpt"),
    "convit_base_plus": _cfg(f"{_MS}/convit_base_plus-5c61c9ce.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_convert=_from_timm)


@register_model
def convit_tiny(pretrained: bool = False, **kwargs) -> ConViT:
    return _create_convit("convit_tiny", pretrained, **kwargs)


@register_model
def convit_tiny_plus(pretrained: bool = False, **kwargs) -> ConViT:
    return _create_convit("convit_tiny_plus", pretrained, **kwargs)


@register_model
def convit_small(pretrained: bool = False, **kwargs) -> ConViT:
    return _create_convit("convit_small", pretrained, **kwargs)


@register_model
def convit_small_plus(pretrained: bool = False, **kwargs) -> ConViT:
    return _create_convit("convit_small_plus", pretrained, **kwargs)


@register_model
def convit_base(pretrained: bool = False, **kwargs) -> ConViT:
    return _create_convit("convit_base", pretrained, **kwargs)


@register_model
def convit_base_plus(pretrained: bool = False, **kwargs) -> ConViT:
    return _create_convit("convit_base_plus", pretrained, **kwargs)
