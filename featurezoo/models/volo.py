"""VOLO (Vision Outlooker), with MindCV's module tree and parameter names.

`VOLO: Vision Outlooker for Visual Recognition <https://arxiv.org/abs/2106.13112>`_.
A conv stem (7x7 stride 2 and two 3x3 convs, BatchNorm, ReLU) and a 4x4 patch
conv bring the image to stride 8; ``network.0`` holds the outlooker blocks
(outlook attention: each 3x3 window's values are re-weighted by attention
weights predicted from the window's centre, a stride-2 grid of windows folded
back) at stride 8; ``network.1`` a 2x2 patch conv to stride 16, where the
position embedding is added; ``network.2/3/4`` pre-norm transformer blocks at
stride 16. Inside the network maps are channels-last (B, H, W, C). Then two
class-attention blocks (``post_network``, CaiT's) update only a class token,
a LayerNorm, and the logits are ``head`` of the class token.

MindCV details kept here, where timm's ``volo_d*_224`` (the same parameter
names and shapes) differ:

* the values of outlook attention are cut by MindSpore's ``nn.Unfold``
  (``ExtractImagePatches``), whose channels are ordered (window row, window
  column, channel) like TensorFlow's, and MindCV reshapes them as if they were
  (channel, window position) like ``torch.nn.functional.unfold``:
  :func:`extract_image_patches` reproduces that (as HaloNet does), so MindCV's
  trained weights see the values they were trained with;
* GELU is MindSpore's default tanh approximation (timm: exact); LayerNorm eps
  1e-7 (MindSpore's default; timm 1e-5);
* the logits are ``head(cls)`` only: MindCV builds ``aux_head`` (its weights
  are in the checkpoint and the parameter count) but never calls it, where
  timm adds ``0.5 * max`` over the tokens of ``aux_head``.

timm's weights would load unchanged, but the first difference cannot be
renamed away (MindCV's values mix window positions into channel slots): with
timm's weights this model computes another function than timm's, so, like
HaloNet's, they are not declared timm twins.

MindCV's own forward cannot run in MindSpore 2.10 (its ``ops.pad`` call takes
nested tuples, rejected on every device; and the CPU build has no
``ExtractImagePatches`` kernel), so parity is checked against timm with these
differences swapped back (``tests/test_volo.py``).

``feature_info``: one entry per block, the outlooker blocks ``network.0.0`` ..
at stride 8 first, then the transformer blocks ``network.2.0`` .. ``network.4.*``
at stride 16 (NCHW maps, no norm), and two parameter-free levels
(:func:`featurezoo.layers.plain_pyramid.staged_feature_info`): stride 4, the
last outlooker block upsampled x2 (bilinear), just before that block's entry,
and stride 32, the last block max-pooled 2x2, at the end; so
``out_indices="pyramid"`` is [last outlooker @ 4 (derived), last outlooker @ 8,
last block @ 16, last block @ 32 (derived)]. For volo_d1::

    0..2   network.0.0 .. network.0.2   192 @ 8
    3      network.0.3@4                192 @ 4    derived
    4      network.0.3                  192 @ 8
    5..18  network.2.0 .. network.4.1   384 @ 16
    19     network.4.1@32               384 @ 32   derived

The class-attention blocks, the norm and both heads are not levels: feature
models drop them.

Input sizes: MindCV's position embedding is learned for the 14x14 stride-16
grid of 224 px, and its outlook attention pools without ``ceil_mode`` (an odd
stride-8 map fails), so it runs only at 217..224 px. Here the embedding is resampled
bicubically for other grids (untouched at 224 px), the patch and downsampling
convs pad as MindSpore's ``same`` (maps of ``ceil(size / stride)``; no padding
at multiples of 16) and the window attention's average pool rounds up as
timm's does, so any input size runs, non-square included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.init import init_weights, trunc_normal
from ..layers.padding import Conv2d
from ..layers.plain_pyramid import level_sources, staged_feature_info, staged_levels
from ..layers.tokens import resample_pos_embed
from ..layers.unfold import extract_image_patches
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["VOLO", "Outlooker", "OutlookAttention", "Transformer", "ClassBlock", "extract_image_patches"]

_LN_EPS = 1e-7  # MindSpore's nn.LayerNorm default


class PatchEmbed(nn.Module):
    """Stem (7x7 stride-2 conv, two 3x3 convs, each + BN + ReLU) and the ``same``-padded patch conv
    (kernel = stride = ``patch_size // 2``), to stride ``patch_size``; returns the NCHW map."""

    def __init__(self, patch_size: int, in_channels: int, hidden_dim: int, embed_dim: int, stem_stride: int = 2):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 7, stem_stride, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(),
        )
        k = patch_size // stem_stride
        self.proj = Conv2d(hidden_dim, embed_dim, k, k, pad_mode="same", has_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x))


class OutlookAttention(nn.Module):
    """Outlook attention on a channels-last map: on a stride-``stride`` grid of ``kernel_size`` windows,
    the window's values are mixed by ``(k*k) x (k*k)`` weights predicted (per head) from the window's
    average-pooled centre, and the windows are folded back (overlaps summed)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 2,
                 qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"VOLO: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = (dim // num_heads) ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        k, s, p, heads = self.kernel_size, self.stride, self.padding, self.num_heads
        h, w = math.ceil(height / s), math.ceil(width / s)
        v = F.pad(self.v(x).permute(0, 3, 1, 2), (p, p, p, p))
        v = extract_image_patches(v, k, s)  # MindSpore's channel order, reshaped as MindCV does
        v = v.reshape(b, heads, c // heads, k * k, h * w).permute(0, 1, 4, 3, 2)  # B, heads, N, kk, C/heads
        # MindCV pools "valid" (only even maps run there); ceil_mode extends it to odd maps, as timm.
        attn = F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
        attn = self.attn(attn).reshape(b, h * w, heads, k * k, k * k).permute(0, 2, 1, 3, 4)
        attn = self.attn_drop((attn * self.scale).softmax(dim=-1))
        x = (attn @ v).permute(0, 1, 4, 3, 2).reshape(b, c * k * k, h * w)
        x = F.fold(x, output_size=(height, width), kernel_size=k, padding=p, stride=s)
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1)))


class Outlooker(nn.Module):
    """Outlooker block (channels-last): ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kernel_size: int = 3, padding: int = 1,
                 stride: int = 2, qkv_bias: bool = False, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = OutlookAttention(dim, num_heads, kernel_size, padding, stride, qkv_bias, attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Multi-head self-attention over a channels-last map (``softmax(q k^T * head_dim^-0.5) v``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"VOLO: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, h, w, c)))


class Transformer(nn.Module):
    """Pre-norm transformer block on a channels-last map."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """Attention of the class token (first token) to every token; returns the new class token (B, 1, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kv = nn.Linear(dim, self.head_dim * num_heads * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, self.head_dim * num_heads, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(x[:, :1]).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(cls.transpose(1, 2).reshape(b, 1, self.num_heads * self.head_dim)))


class ClassBlock(nn.Module):
    """CaiT's class-attention block: only the class token changes."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :1] + self.drop_path(self.attn(self.norm1(x)))
        cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
        return torch.cat([cls, x[:, 1:]], dim=1)


class Downsample(nn.Module):
    """A ``same``-padded patch conv (kernel = stride = ``patch_size``) between channels-last stages."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int = 2):
        super().__init__()
        self.patch_size = patch_size
        self.proj = Conv2d(in_dim, out_dim, patch_size, patch_size, pad_mode="same", has_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VOLO(nn.Module):
    """VOLO classifier; ``feature_info``: every block (outlookers at stride 8, transformer blocks at 16)
    and the derived stride-4 and stride-32 levels.

    Args:
        layers: blocks per ``network`` stage (MindCV: 4 entries; the first stage outlookers).
        embed_dims, num_heads, mlp_ratios: per stage.
        downsamples: a 2x2 patch conv after the stage (MindCV: only after the first).
        outlook_attention: the stage is outlooker blocks (else transformer blocks).
        image_size: the input size the position embedding is learned for.
        patch_size: the stride after the stem (8); the position embedding is at ``patch_size * pooling_scale``.
        stem_hidden_dim: the stem convs' width.
        post_layers: the class-attention blocks (``"ca"``) after the network.
        in_channels, num_classes: input channels, classifier outputs (0: no heads).
        qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: as MindCV (stochastic depth only in the
            transformer blocks, linear over all blocks).
    """

    def __init__(self, layers: Sequence[int], embed_dims: Sequence[int], num_heads: Sequence[int],
                 mlp_ratios: Sequence[float], downsamples: Sequence[bool], outlook_attention: Sequence[bool],
                 image_size: int = 224, patch_size: int = 8, stem_hidden_dim: int = 64,
                 post_layers: Sequence[str] = ("ca", "ca"), pooling_scale: int = 2, in_channels: int = 3,
                 num_classes: int = 1000, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, out_kernel: int = 3, out_stride: int = 2,
                 out_padding: int = 1):
        super().__init__()
        if any(t != "ca" for t in post_layers):
            raise ValueError(f"VOLO: post_layers must be 'ca' blocks, got {list(post_layers)}")
        self.patch_embed = PatchEmbed(patch_size, in_channels, stem_hidden_dim, embed_dims[0])
        self.pos_grid = (image_size // patch_size // pooling_scale,) * 2
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.pos_grid, embed_dims[-1]))
        self.pos_drop = nn.Dropout(drop_rate)

        network: List[nn.Module] = []
        stages: List[Tuple[int, int, List[str]]] = []
        self._block_at: List[Tuple[int, int]] = []  # block index (run order) -> (network index, index in stage)
        stride, total = patch_size, sum(layers)
        for i, depth in enumerate(layers):
            if outlook_attention[i]:
                # MindCV gives the outlookers no stochastic depth.
                blocks = [Outlooker(embed_dims[i], num_heads[i], mlp_ratios[i], out_kernel, out_padding, out_stride,
                                    qkv_bias, attn_drop_rate) for _ in range(depth)]
            else:
                blocks = [Transformer(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, attn_drop_rate,
                                      drop_path_rate * (j + sum(layers[:i])) / (total - 1)) for j in range(depth)]
            names = [f"network.{len(network)}.{j}" for j in range(depth)]
            self._block_at += [(len(network), j) for j in range(depth)]
            if stages and stages[-1][1] == stride:
                stages[-1][2].extend(names)
            else:
                stages.append((embed_dims[i], stride, names))
            network.append(nn.Sequential(*blocks))
            if downsamples[i]:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], 2))
                stride *= 2
        self.network = nn.ModuleList(network)
        self.feature_info = staged_feature_info(stages)
        self._level_sources = level_sources(self.feature_info)

        dim = embed_dims[-1]
        self.post_network = nn.ModuleList([
            ClassBlock(dim, num_heads[-1], mlp_ratios[-1], qkv_bias, attn_drop=attn_drop_rate) for _ in post_layers
        ])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.num_features = dim
        # MindCV builds the token-labelling head (its weights are in the checkpoint) but never calls it.
        self.aux_head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense TruncatedNormal(0.02), biases zero; convs MindSpore's default (torch's);
        # embeddings TruncatedNormal(0.02).
        init_weights(self, linear=trunc_normal(0.02, -2.0, 2.0))
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)

    def _pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The (1, H, W, C) position embedding for the stride-16 grid ``hw`` (its own values at the native grid)."""
        return resample_pos_embed(self.pos_embed.flatten(1, 2), hw, self.pos_grid).reshape(1, hw[0], hw[1], -1)

    def _run(self, x: torch.Tensor, keep: Sequence[int] = (), last: Optional[int] = None
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """The stem and blocks 0..``last`` (default: all): the NCHW maps of the blocks in ``keep``, and the
        channels-last output of the last block run."""
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        maps: Dict[int, torch.Tensor] = {}
        block = 0
        for idx, stage in enumerate(self.network):
            if idx == 2:  # MindCV adds the position embedding after the outlookers and the downsampling
                x = self.pos_drop(x + self._pos_embed((x.shape[1], x.shape[2])))
            if isinstance(stage, Downsample):
                x = stage(x)
                continue
            for blk in stage:
                x = blk(x)
                if block in keep:
                    maps[block] = x.permute(0, 3, 1, 2).contiguous()
                if block == last:
                    return maps, x
                block += 1
        return maps, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing no block past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        keep = {self._level_sources[i] for i in take}
        maps, _ = self._run(x, keep, max(keep))
        return staged_levels(self.feature_info, sorted(take), maps, input_hw=x.shape[-2:])

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the class-attention blocks, the norm, both heads and every block after the deepest one
        the entries ``indices`` need (and the position embedding if no block after it is kept)."""
        take, _ = take_levels(indices, len(self.feature_info))
        stage, j = self._block_at[max(self._level_sources[i] for i in take)]
        del self.network[stage][j + 1:]
        del self.network[stage + 1:]
        if stage < 2:
            del self.pos_embed
        del self.post_network, self.cls_token, self.aux_head, self.norm, self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the class-attention blocks and the final norm, (B, 1 + H*W, C), class token first."""
        x = self._run(x)[1]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        for blk in self.post_network:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_volo(variant: str, pretrained: bool = False, **kwargs) -> VOLO:
    c = model_cfgs[variant]
    return build_model_with_cfg(VOLO, pretrained, default_cfg=default_cfgs[variant], layers=c.layers,
                                embed_dims=c.embed_dims, num_heads=c.num_heads, mlp_ratios=c.mlp_ratios,
                                downsamples=(True, False, False, False),
                                outlook_attention=(True, False, False, False), stem_hidden_dim=c.stem_hidden_dim,
                                **kwargs)


_SIZE_NOTE = ("MindCV's position embedding is for the 14x14 stride-16 grid of 224 px, and its outlook attention's "
              "'valid' average pool needs an even stride-8 map: MindCV runs only there. featurezoo resamples the "
              "embedding bicubically for other grids and pools with ceil_mode (as timm), so any size runs")


def _cfg(url: str = "", crop_pct: float = 0.96):
    return dict(url=url, num_classes=1000, input_size=(3, 224, 224), interpolation="bicubic", crop_pct=crop_pct,
                first_conv="patch_embed.conv.0", classifier="head,aux_head", fixed_input_size=True,
                size_note=_SIZE_NOTE)


@dataclass(frozen=True)
class VOLOCfg:
    """A variant's shape (see :class:`VOLO`): outlookers, then three transformer stages."""

    layers: Tuple[int, int, int, int]
    embed_dims: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int]
    mlp_ratios: Tuple[float, float, float, float] = (3, 3, 3, 3)
    stem_hidden_dim: int = 64


model_cfgs = dict(
    volo_d1=VOLOCfg((4, 4, 8, 2), (192, 384, 384, 384), (6, 12, 12, 12)),
    volo_d2=VOLOCfg((6, 4, 10, 4), (256, 512, 512, 512), (8, 16, 16, 16)),
    volo_d3=VOLOCfg((8, 8, 16, 4), (256, 512, 512, 512), (8, 16, 16, 16)),
    volo_d4=VOLOCfg((8, 8, 16, 4), (384, 768, 768, 768), (12, 16, 16, 16)),
    volo_d5=VOLOCfg((12, 12, 20, 4), (384, 768, 768, 768), (12, 16, 16, 16), (4, 4, 4, 4), 128),
)

_MS = "https://download.mindspore.cn/toolkits/mindcv/volo"

# timm's VOLO has our parameter names: no renames. Computation differs (unfold channel order, GELU,
# LayerNorm eps, aux head in the logits): see the module docstring.
default_cfgs = generate_default_cfgs({
    "volo_d1": _cfg(f"{_MS}/volo_d1-c7efada9.ckpt"),
    "volo_d2": _cfg(f"{_MS}/volo_d2-0910a460.ckpt"),
    "volo_d3": _cfg(f"{_MS}/volo_d3-25916c36.ckpt"),
    "volo_d4": _cfg(f"{_MS}/volo_d4-6c88cd33.ckpt", crop_pct=1.15),
    "volo_d5": _cfg(crop_pct=1.15),
})


@register_model
def volo_d1(pretrained: bool = False, **kwargs) -> VOLO:
    return _create_volo("volo_d1", pretrained, **kwargs)


@register_model
def volo_d2(pretrained: bool = False, **kwargs) -> VOLO:
    return _create_volo("volo_d2", pretrained, **kwargs)


@register_model
def volo_d3(pretrained: bool = False, **kwargs) -> VOLO:
    return _create_volo("volo_d3", pretrained, **kwargs)


@register_model
def volo_d4(pretrained: bool = False, **kwargs) -> VOLO:
    return _create_volo("volo_d4", pretrained, **kwargs)


@register_model
def volo_d5(pretrained: bool = False, **kwargs) -> VOLO:
    return _create_volo("volo_d5", pretrained, **kwargs)
