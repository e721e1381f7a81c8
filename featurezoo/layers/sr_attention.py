"""Spatial-reduction attention (SRA) of the Pyramid Vision Transformers (PVT and PVTv2).

`Pyramid Vision Transformer <https://arxiv.org/abs/2102.12122>`_: queries come
from every token, keys and values from the token map shrunk by a
``sr_ratio x sr_ratio`` stride-``sr_ratio`` convolution and a LayerNorm, so a
stage-1 map of 56x56 tokens attends to 7x7 keys.

MindCV's module tree and computation: ``q``, ``kv`` (keys and values fused),
``proj``, and, when ``sr_ratio > 1``, ``sr`` (MindSpore's ``same`` padding,
which pads only where the map is not a multiple of ``sr_ratio``) and ``norm``
(MindSpore's default LayerNorm eps, 1e-7). Scores are scaled by
``head_dim ** -0.5``, so ``F.scaled_dot_product_attention`` computes the same
function.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .padding import Conv2d

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(nn.Module):
    """``(B, N, C)`` tokens of an ``h x w`` map (plus any prefix tokens when ``sr_ratio == 1``) -> ``(B, N, C)``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1, norm_eps: float = 1e-7):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = Conv2d(dim, dim, sr_ratio, sr_ratio, pad_mode="same", has_bias=True)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            # A channels-last view of the tokens, no copy; the conv accepts it as it is.
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))
