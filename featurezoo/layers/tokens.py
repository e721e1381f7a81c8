"""Pieces every transformer family needs to serve NCHW feature maps at any input size.

* :func:`resample_pos_embed`: an absolute position embedding learned for one
  grid, interpolated bicubically (as timm does) to another; the native grid is
  returned untouched, so the native size stays bit-identical.
* :func:`resample_pos_map`: the same for an embedding kept as an NCHW map (PiT, Visformer).
* :func:`tokens_to_nchw` / :func:`nchw_to_tokens`: ``(B, H*W, C)`` <-> ``(B, C, H, W)``.
* :func:`grid_size`: the token grid a patch embedding produces at a given input size.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ..validate import autocast_on
from .fx_calls import fx_call

__all__ = ["resample_pos_embed", "resample_pos_map", "tokens_to_nchw", "nchw_to_tokens", "grid_size"]


def grid_size(input_hw: Sequence[int], patch: int, ceil: bool = False) -> Tuple[int, int]:
    """Token grid of a stride-``patch`` embedding: floor for unpadded ("valid") patching,
    ceil for MindSpore's ``same`` padding."""
    if ceil:
        return tuple(-(-int(s) // patch) for s in input_hw)  # type: ignore[return-value]
    return tuple(int(s) // patch for s in input_hw)  # type: ignore[return-value]


@fx_call
def resample_pos_embed(pos_embed: torch.Tensor, new_hw: Sequence[int], old_hw: Sequence[int] = (),
                       num_prefix_tokens: int = 0, mode: str = "bicubic") -> torch.Tensor:
    """``pos_embed`` (1, prefix + H*W, C) learned for the grid ``old_hw`` (square if not given),
    resampled to ``new_hw``; prefix tokens (cls, dist) keep their embeddings."""
    new_hw = (int(new_hw[0]), int(new_hw[1]))
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if not old_hw:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"position embedding of {grid.shape[1]} tokens is not a square grid; pass old_hw")
        old_hw = (side, side)
    old_hw = (int(old_hw[0]), int(old_hw[1]))
    if old_hw == new_hw:
        return pos_embed
    if autocast_on(pos_embed.device.type):
        # Outside autocast: CPU autocast rejects float16 (PVT's embeddings are float16, as MindCV's) in the
        # ops it re-types ("Unexpected floating ScalarType in at::autocast::prioritize").
        with torch.autocast(pos_embed.device.type, enabled=False):
            return _resample_grid(prefix, grid, old_hw, new_hw, mode, pos_embed.dtype)
    return _resample_grid(prefix, grid, old_hw, new_hw, mode, pos_embed.dtype)


def _resample_grid(prefix: torch.Tensor, grid: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int],
                   mode: str, dtype: torch.dtype) -> torch.Tensor:
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)
    # Interpolate in float32 (as timm does) and return in the embedding's dtype.
    grid = F.interpolate(grid.float(), size=new_hw, mode=mode, align_corners=False).to(dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim)
    return torch.cat([prefix, grid], dim=1) if prefix.shape[1] else grid


@fx_call
def resample_pos_map(pos_embed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An NCHW position embedding ``(1, C, H, W)`` on the grid of the map ``like``: itself on its native
    grid, resampled bicubically otherwise."""
    hw = tuple(like.shape[-2:])
    if tuple(pos_embed.shape[-2:]) == hw:
        return pos_embed
    return tokens_to_nchw(resample_pos_embed(nchw_to_tokens(pos_embed), hw, pos_embed.shape[-2:]), hw)


@fx_call
def tokens_to_nchw(x: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens (no prefix tokens) as a contiguous ``(B, C, H, W)`` map."""
    b, n, c = x.shape
    h, w = int(hw[0]), int(hw[1])
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    return x.transpose(1, 2).reshape(b, c, h, w).contiguous()


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` as ``(B, H*W, C)`` tokens."""
    return x.flatten(2).transpose(1, 2)
