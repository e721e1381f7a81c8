"""Vision Transformer (ViT), with MindCV's module tree and parameter names.

`An Image is Worth 16x16 Words <https://arxiv.org/abs/2010.11929>`_. An
unpadded patch conv (k = s = patch), a class token, a learned position
embedding, ``depth`` pre-norm blocks at the patch stride, a final LayerNorm
and a linear head on the class token. MAE's fine-tuning models
(:mod:`featurezoo.models.mae`) are this class with average pooling and
``fc_norm``.

MindCV details kept here (and where timm's ``vit_*`` twins differ):
LayerNorm eps 1e-7 (MindSpore's default; timm 1e-6), GELU is MindSpore's
default tanh approximation (timm: exact). Parameter names are timm's too, so
timm weights load unchanged. Attention is ``F.scaled_dot_product_attention``
(the same function as MindCV's ``softmax(q k^T * head_dim^-0.5) v``).

``feature_info``: one entry per block, ``blocks.0`` .. ``blocks.{depth-1}``,
the spatial tokens (class token dropped, no final norm, as timm's
``forward_intermediates``) as a NCHW map at the patch stride, marked
``native=True``; plus the parameter-free pyramid levels derived from the last
block (``native=False``: x4/x2 bilinear up, 2x2 max pool down; see
:mod:`featurezoo.layers.plain_pyramid`), so ``out_indices="pyramid"`` gives
strides 4/8/16/32 with the last block itself as its patch-stride level. The
patch conv is unpadded, so a map has ``floor(size / patch)`` tokens per side
(the cfg's ``valid_padding``).

Input sizes: MindCV runs only at the size the position embedding is learned
for; here the embedding is resampled bicubically (timm's rule) to any other
grid, non-square included, for the feature model and the classifier alike,
and left untouched at the native grid. Inputs smaller than the patch raise a
``ValueError``.
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
from ..layers.init import he_uniform, init_weights, trunc_normal
from ..layers.plain_pyramid import level_blocks, plain_feature_info, plain_levels
from ..layers.tokens import nchw_to_tokens, resample_pos_embed, tokens_to_nchw
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["VisionTransformer", "Block", "Attention", "Mlp", "LayerScale", "PatchEmbed"]

_LN_EPS = 1e-7  # MindSpore's nn.LayerNorm default


class PatchEmbed(nn.Module):
    """The unpadded patch conv (kernel = stride = ``patch_size``); returns the NCHW map."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, patch_size, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"ViT: a {h}x{w} input is smaller than the {p}-px patch; inputs must be at least "
                             f"{p}x{p} px")
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT: dim {dim} is not divisible by num_heads {num_heads}")
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


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (MindCV's name), used when ``init_values`` is given."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class Block(nn.Module):
    """Pre-norm transformer block (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, init_values: Optional[float] = None,
                 drop_path: float = 0.0, norm_eps: float = _LN_EPS, gelu_approximate: str = "tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop, gelu_approximate)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT classifier; ``feature_info``: every block at the patch stride plus the derived pyramid levels.

    Args:
        image_size: the input size the position embedding is learned for.
        patch_size: the patch conv's kernel and stride (the blocks' stride).
        in_channels, num_classes: input channels, classifier outputs (0: no head).
        global_pool: ``"token"`` (the class token) or ``"avg"`` (mean of the patch tokens).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the blocks' shape.
        fc_norm: a LayerNorm after pooling instead of the final norm (default: with ``"avg"``).
        norm_eps: every LayerNorm's eps (MindSpore's default 1e-7; MAE 1e-6).
        gelu_approximate: ``"tanh"`` (MindSpore's default GELU) or ``"none"`` (exact).
        init_values: layer-scale init (``None``: no layer scale).
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout before the
            head, after the position embedding, in the blocks, on attention, stochastic depth (linear).
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_channels: int = 3,
                 global_pool: str = "token", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, fc_norm: Optional[bool] = None,
                 norm_eps: float = _LN_EPS, gelu_approximate: str = "tanh", init_values: Optional[float] = None,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_classes: int = 1000):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"ViT: global_pool must be 'token' or 'avg', got {global_pool!r}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.pos_grid = (image_size // patch_size, image_size // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, init_values, dpr[i],
                  norm_eps, gelu_approximate)
            for i in range(depth)
        ])
        self.feature_info = plain_feature_info(embed_dim, patch_size, [f"blocks.{i}" for i in range(depth)])
        self._level_blocks = level_blocks(self.feature_info)
        self.num_features = embed_dim
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense TruncatedNormal(0.02), Conv2d HeUniform, biases zero; embeddings TruncatedNormal(0.02).
        init_weights(self, conv=he_uniform, linear=trunc_normal(0.02, -2.0, 2.0))
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch tokens with the class token prepended and the position embedding added; the token grid."""
        x = self.patch_embed(x)
        hw = (x.shape[-2], x.shape[-1])
        pos = resample_pos_embed(self.pos_embed, hw, self.pos_grid, num_prefix_tokens=self.num_prefix_tokens)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), nchw_to_tokens(x)), dim=1)
        return self.pos_drop(x + pos), hw

    def _run(self, x: torch.Tensor, keep: Sequence[int] = (), last: Optional[int] = None
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """Blocks 0..``last`` (default: all): the NCHW maps of the blocks in ``keep``, and the last tokens."""
        x, hw = self._embed(x)
        maps: Dict[int, torch.Tensor] = {}
        stop = len(self.blocks) if last is None else last + 1
        for i in range(stop):
            x = self.blocks[i](x)
            if i in keep:
                maps[i] = tokens_to_nchw(x[:, self.num_prefix_tokens:], hw)
        return maps, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing no block past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        keep = {self._level_blocks[i] for i in take}
        maps, _ = self._run(x, keep, max(keep))
        return plain_levels(self.feature_info, sorted(take), maps)

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head, the norms and every block after the deepest one the entries ``indices`` need."""
        take, _ = take_levels(indices, len(self.feature_info))
        last = max(self._level_blocks[i] for i in take)
        del self.blocks[last + 1:]
        del self.norm, self.fc_norm, self.head_drop, self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the blocks and the final norm, (B, 1 + H*W, C)."""
        return self.norm(self._run(x)[1])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return self.head(self.head_drop(self.fc_norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def vit_size_facts(image_size: int, patch_size: int) -> dict:
    """The input-size facts of a ViT-shaped model (also MAE's)."""
    grid = image_size // patch_size
    return dict(
        input_size=(3, image_size, image_size), fixed_input_size=True, min_input_size=(3, patch_size, patch_size),
        size_note=f"MindCV's position embedding is for the {grid}x{grid} token grid of {image_size} px and MindCV "
                  f"runs only there; featurezoo resamples it bicubically for other sizes (inputs of at least the "
                  f"{patch_size}-px patch)",
        valid_padding=f"the k{patch_size} s{patch_size} patch conv is unpadded: floor(size / {patch_size}) tokens "
                      f"per side, which the derived pyramid levels scale",
    )


def _cfg(variant: str, url: str = ""):
    c = model_cfgs[variant]
    return dict(url=url, num_classes=1000, first_conv="patch_embed.proj", classifier="head",
                **vit_size_facts(c.image_size, c.patch_size))


@dataclass(frozen=True)
class ViTCfg:
    """A variant's shape (see :class:`VisionTransformer`)."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int


model_cfgs = dict(
    vit_b_16_224=ViTCfg(224, 16, 768, 12, 12),
    vit_b_16_384=ViTCfg(384, 16, 768, 12, 12),
    vit_l_16_224=ViTCfg(224, 16, 1024, 24, 16),
    vit_l_16_384=ViTCfg(384, 16, 1024, 24, 16),
    vit_b_32_224=ViTCfg(224, 32, 768, 12, 12),
    vit_b_32_384=ViTCfg(384, 32, 768, 12, 12),
    vit_l_32_224=ViTCfg(224, 32, 1024, 24, 16),
)

_MS = "https://download.mindspore.cn/toolkits/mindcv/vit"

# Same parameter names as timm: no renames. Computation differs (LN eps, tanh GELU): see the module docstring.
# timm's vit_large_patch32_224 is built without a head by default (num_classes=0, its weights are in21k
# features), so it is no declared twin of vit_l_32_224; with num_classes=1000 it is one (tests/test_vit.py).
_TIMM_TWINS = {
    "vit_b_16_224": "vit_base_patch16_224", "vit_b_16_384": "vit_base_patch16_384",
    "vit_l_16_224": "vit_large_patch16_224", "vit_l_16_384": "vit_large_patch16_384",
    "vit_b_32_224": "vit_base_patch32_224", "vit_b_32_384": "vit_base_patch32_384",
}

default_cfgs = generate_default_cfgs({
    "vit_b_16_224": _cfg("vit_b_16_224"),
    "vit_b_16_384": _cfg("vit_b_16_384"),
    "vit_l_16_224": _cfg("vit_l_16_224", f"{_MS}/vit_l_16_224-97d0fdbc.ckpt"),
    "vit_l_16_384": _cfg("vit_l_16_384"),
    "vit_b_32_224": _cfg("vit_b_32_224", f"{_MS}/vit_b_32_224-f50866e8.ckpt"),
    "vit_b_32_384": _cfg("vit_b_32_384"),
    "vit_l_32_224": _cfg("vit_l_32_224", f"{_MS}/vit_l_32_224-b80441df.ckpt"),
}, timm_twins=_TIMM_TWINS)


@register_model
def vit_b_16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_b_16_224", pretrained, **kwargs)


@register_model
def vit_b_16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_b_16_384", pretrained, **kwargs)


@register_model
def vit_l_16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_l_16_224", pretrained, **kwargs)


@register_model
def vit_l_16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_l_16_384", pretrained, **kwargs)


@register_model
def vit_b_32_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_b_32_224", pretrained, **kwargs)


@register_model
def vit_b_32_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_b_32_384", pretrained, **kwargs)


@register_model
def vit_l_32_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vit("vit_l_32_224", pretrained, **kwargs)
