"""PiT (Pooling-based Vision Transformer), with MindCV's module tree and parameter names.

`Rethinking Spatial Dimensions of Vision Transformers <https://arxiv.org/abs/2103.16302>`_.
An unpadded patch conv (k16 s8; PiT-B k14 s7) plus a learned position
embedding, then three transformer stages whose tokens are a spatial map and
one class token. Between stages a depthwise k3 s2 conv halves the map and
doubles the channels, and a linear layer widens the class token.

MindCV details kept here: q, k and v are three ``Linear`` layers (timm fuses
them into ``qkv``); GELU is MindSpore's default tanh approximation (timm's is
exact); LayerNorm eps 1e-6; the logits are the head applied to the normalised
class token.

``feature_info``: the spatial tokens after ``transformers.0``..``2`` as NCHW
maps (64, 128, 256 channels for PiT-Ti), at reductions stride, 2 x stride,
4 x stride (8/16/32; 7/14/28 for PiT-B), as timm's PiT. There is no stride-4
level. The patch conv is unpadded and the pools round up, so a map has
``(size - patch) // stride + 1`` pixels, halved (rounded up) per stage: 27, 14, 7
at 224 px, not ``ceil(224 / 8)`` (the cfg's ``valid_padding``).

Input sizes: the position embedding is learned for the 224-px grid (27x27;
31x31 for PiT-B); at other sizes it is resampled bicubically to the grid
(timm's rule), for the classifier and the feature model alike (MindCV runs only
at 224). Inputs smaller than the patch raise a ``ValueError``.

Checkpoint names: MindCV's ``transformers`` and ``pools`` CellLists are empty
when attached and filled by ``append``, so MindSpore saves
``transformers.{i}.blocks...`` as ``0.blocks.{i}.blocks...`` (and
``transformers.0.blocks`` as ``0.blocks``) and ``pools.{i}`` as ``{i}``; the
cfg's ``mindcv_renames`` map those names onto the module paths.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.fx_calls import fx_call
from ..layers.tokens import nchw_to_tokens, resample_pos_map, tokens_to_nchw
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["PoolingTransformer", "Transformer", "Block", "Attention", "Mlp", "ConvHeadPooling", "ConvEmbedding"]

_LN_EPS = 1e-6
_POOL_STRIDE = 2


@fx_call
def check_patch_fits(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x``, or a ``ValueError`` when it is smaller than one ``patch`` x ``patch`` patch."""
    h, w = x.shape[-2:]
    if h < patch or w < patch:
        raise ValueError(f"PiT: a {h}x{w} input is smaller than the {patch}-px patch; inputs must be "
                         f"at least {patch}x{patch} px")
    return x


class ConvEmbedding(nn.Module):
    """The unpadded patch conv (kernel ``patch_size``, stride ``stride``)."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, patch_size, stride, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvHeadPooling(nn.Module):
    """Depthwise k3 s2 conv on the map (channel multiplier ``out // in``), linear layer on the class token."""

    def __init__(self, in_feature: int, out_feature: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_feature, out_feature, stride + 1, stride, padding=stride // 2, groups=in_feature,
                              bias=True)
        self.fc = nn.Linear(in_feature, out_feature)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.fc(cls_token)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (MindCV's layout), scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (self.q, self.k, self.v))
        # The default scale is MindCV's head_dim ** -0.5, applied to q before q @ k^T.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """One stage: the map's tokens after the class token(s), through the blocks, and back to NCHW."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_probs: Sequence[float] = ()):
        super().__init__()
        probs = list(drop_path_probs) or [0.0] * depth
        self.blocks = nn.ModuleList([
            Block(dim, heads, mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=probs[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hw = x.shape[-2:]
        prefix = cls_tokens.shape[1]
        tokens = torch.cat((cls_tokens, nchw_to_tokens(x)), dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens_to_nchw(tokens[:, prefix:], hw), tokens[:, :prefix]


class PoolingTransformer(nn.Module):
    """PiT classifier; ``feature_info``: the maps after ``transformers.0`` .. ``transformers.2``.

    Args:
        image_size: the input size the position embedding is learned for.
        patch_size, stride: the patch conv's kernel and stride.
        base_dims: channels per head in each stage; heads: heads per stage
            (a stage has ``base_dims[i] * heads[i]`` channels).
        depth: blocks per stage.
        mlp_ratio: MLP width over the stage width.
        num_classes, in_channels: classifier outputs, input channels.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout,
            stochastic depth (rising linearly over all blocks).
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, stride: int = 8,
                 base_dims: Sequence[int] = (48, 48, 48), depth: Sequence[int] = (2, 6, 4),
                 heads: Sequence[int] = (2, 4, 8), mlp_ratio: float = 4.0, num_classes: int = 1000,
                 in_channels: int = 3, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if not len(base_dims) == len(depth) == len(heads):
            raise ValueError(f"PiT: base_dims {list(base_dims)}, depth {list(depth)} and heads {list(heads)} "
                             f"differ in length")
        self.patch_size = patch_size
        dims = [b * h for b, h in zip(base_dims, heads)]
        grid = (image_size - patch_size) // stride + 1  # unpadded patch conv
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], grid, grid))
        self.patch_embed = ConvEmbedding(in_channels, dims[0], patch_size, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depth)
        self.transformers = nn.ModuleList()
        self.pools = nn.ModuleList()
        self.feature_info: List[dict] = []
        reduction, done = stride, 0
        for i, (dim, d, h) in enumerate(zip(dims, depth, heads)):
            if i > 0:
                self.pools.append(ConvHeadPooling(dims[i - 1], dim, _POOL_STRIDE))
                reduction *= _POOL_STRIDE
            probs = [drop_path_rate * j / total for j in range(done, done + d)]
            done += d
            self.transformers.append(Transformer(dim, d, h, mlp_ratio, drop_rate, attn_drop_rate, probs))
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"transformers.{i}"))
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=_LN_EPS)
        self.head = nn.Linear(dims[-1], num_classes)
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # MindCV: U(+-sqrt(1 / n)), n = kernel area x all input channels (also for the depthwise pools).
                bound = math.sqrt(1.0 / (m.kernel_size[0] * m.kernel_size[1] * m.in_channels))
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[0])  # MindCV bounds by the number of outputs
            else:
                continue
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound)

    def _run(self, x: torch.Tensor, take: Sequence[int], deepest: int
             ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The stages up to ``deepest``: the maps of the levels in ``take``, and the last class token."""
        x = self.patch_embed(check_patch_fits(x, self.patch_size))
        x = self.pos_drop(x + resample_pos_map(self.pos_embed, x))
        # A copy (MindCV's Tile), not an expand view: under no_grad a view of a parameter requires grad
        # without a grad_fn, which torch's ModuleTracker (FlopCounterMode, the CLI's info) cannot take.
        cls_tokens = self.cls_token.repeat(x.shape[0], 1, 1)
        out = []
        for i, stage in enumerate(self.transformers[:deepest + 1]):
            if i > 0:
                x, cls_tokens = self.pools[i - 1](x, cls_tokens)
            x, cls_tokens = stage(x, cls_tokens)
            if i in take:
                out.append(x)
        return out, cls_tokens

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        return self._run(x, take, deepest)[0]

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head, the final norm and every stage (and pool) after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.head, self.norm
        del self.transformers[deepest + 1:]
        del self.pools[deepest:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token(s), (B, 1, C)."""
        last = len(self.feature_info) - 1
        return self.norm(self._run(x, (), last)[1])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_pit(variant: str, pretrained: bool = False, **kwargs) -> PoolingTransformer:
    return build_model_with_cfg(PoolingTransformer, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


def _cfg(url: str = "", patch: int = 16, stride: int = 8, **kwargs):
    grid = (224 - patch) // stride + 1
    return dict(
        url=url, num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
        first_conv="patch_embed.conv", classifier="head",
        fixed_input_size=True, min_input_size=(3, patch, patch),
        size_note=f"MindCV's position embedding is learned for the {grid}x{grid} token grid of 224 px and MindCV "
                  f"runs only there; featurezoo resamples it bicubically for other sizes (inputs of at least the "
                  f"{patch}-px patch)",
        valid_padding=f"the k{patch} s{stride} patch conv is unpadded: {grid}x{grid} tokens at 224 px",
        **kwargs,
    )


_MS = "https://download.mindspore.cn/toolkits/mindcv/pit"

# MindSpore's saved names (see the module docstring) -> module paths; applied in order, module paths pass unchanged.
_MINDCV_RENAMES = (
    (r"^0\.blocks\.(\d+)\.blocks\.", r"transformers.\1.blocks."),
    (r"^0\.blocks\.", "transformers.0.blocks."),
    (r"^(\d+)\.(conv|fc)\.", r"pools.\1.\2."),
)

_TIMM_TWINS = {f"pit_{v}": f"pit_{v}_224" for v in ("ti", "xs", "s", "b")}
_POOL_NAME = re.compile(r"^transformers\.(\d+)\.pool\.")  # timm keeps stage i's pool inside the stage


def _from_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's PiT state dict under our names: ``transformers.{i}.pool`` is ``pools.{i-1}``, and the fused
    ``attn.qkv`` weight and bias are split into ``attn.q``, ``attn.k``, ``attn.v``."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        m = _POOL_NAME.match(name)
        if m:
            name = f"pools.{int(m[1]) - 1}.{name[m.end():]}"
        if ".attn.qkv." in name:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[name.replace(".attn.qkv.", f".attn.{part}.")] = chunk.clone()
            continue
        out[name] = t
    return out


default_cfgs = generate_default_cfgs({
    "pit_ti": _cfg(f"{_MS}/pit_ti-e647a593.ckpt"),
    "pit_xs": _cfg(f"{_MS}/pit_xs-fea0d37e.ckpt"),
    "pit_s": _cfg(f"{_MS}/pit_s-3c1ba36f.ckpt"),
    "pit_b": _cfg(f"{_MS}/pit_b-2411c9b6.ckpt", patch=14, stride=7),
}, timm_twins=_TIMM_TWINS, timm_convert=_from_timm, mindcv_renames=_MINDCV_RENAMES)


@dataclass(frozen=True)
class PiTCfg:
    """A variant's shape (see :class:`PoolingTransformer`)."""

    patch_size: int
    stride: int
    base_dims: Tuple[int, ...]
    depth: Tuple[int, ...]
    heads: Tuple[int, ...]
    mlp_ratio: float = 4.0


model_cfgs = dict(
    pit_ti=PiTCfg(patch_size=16, stride=8, base_dims=(32, 32, 32), depth=(2, 6, 4), heads=(2, 4, 8)),
    pit_xs=PiTCfg(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(2, 4, 8)),
    pit_s=PiTCfg(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12)),
    pit_b=PiTCfg(patch_size=14, stride=7, base_dims=(64, 64, 64), depth=(3, 6, 4), heads=(4, 8, 16)),
)


@register_model
def pit_ti(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    return _create_pit("pit_ti", pretrained, **kwargs)


@register_model
def pit_xs(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    return _create_pit("pit_xs", pretrained, **kwargs)


@register_model
def pit_s(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    return _create_pit("pit_s", pretrained, **kwargs)


@register_model
def pit_b(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    return _create_pit("pit_b", pretrained, **kwargs)
