"""Shifted-window pieces shared by Swin and Swin V2, for token maps of any size.

Token maps are channels-last ``(B, H, W, C)``. A map whose sides are not
multiples of the window is padded with zeros at the bottom and right
(:func:`pad_to_multiple`) and the shifted-window mask is built for the padded
grid (:func:`shift_window_mask`), as the official Swin detection code does:
pad first, then shift, so a padded row or column never separates a window from
the tokens that wrapped around into it.

Also shared: :func:`project_qkv` and :func:`window_attention` (the attention
around ``F.scaled_dot_product_attention``), :class:`PatchEmbed` (patch conv to
tokens) and :class:`Mlp` (fc1, tanh GELU, fc2).
"""
from __future__ import annotations

from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import take_levels
from .constants import cacheable, tensor_cache
from .mlp import Mlp

__all__ = ["SwinStages", "window_partition", "window_reverse", "relative_position_index", "shift_window_mask",
           "pad_to_multiple", "padded_size", "project_qkv", "fuse_qkv", "window_attention", "ShiftMaskCache",
           "PatchEmbed", "Mlp"]

# MindCV's (and the paper's) additive mask between tokens of different shifted regions.
MASK_VALUE = -100.0


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom and right to sides divisible by ``multiple``
    (returned as is when they already are)."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = padded_size(h, multiple) - h, padded_size(w, multiple) - w
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, nW, window * window, C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, window * window, C)`` -> ``(B, H, W, C)``."""
    b, c = x.shape[0], x.shape[-1]
    x = x.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(window: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(N, N)`` int64, N = window²: the index into a ``(2w-1)²`` table of the offset
    (row, column) from token j to token i of a window, ``(dr + w - 1) * (2w - 1) + dc + w - 1``,
    on ``device`` (default: the default device; computed once, on the CPU)."""
    return _relative_position_index(window).to(device or torch.get_default_device(), copy=True)


@tensor_cache()
def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.arange(window, device="cpu")
    rows = coords.repeat_interleave(window)
    cols = coords.repeat(window)
    dr = rows[:, None] - rows[None, :] + window - 1
    dc = cols[:, None] - cols[None, :] + window - 1
    return dr * (2 * window - 1) + dc


def _region(size: int, window: int, shift: int) -> torch.Tensor:
    """Region label along one side of the shifted grid: 0 before ``size - window``, 1 up to
    ``size - shift``, 2 for the last ``shift`` positions (the tokens that wrapped around)."""
    pos = torch.arange(size, device="cpu")
    return (pos >= size - window).long() + (pos >= size - shift).long()


def shift_window_mask(h: int, w: int, window: int, shift: int,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """``(nW, N, N)`` float32 additive mask of shifted-window attention on an ``h x w`` grid
    (sides multiples of ``window``): 0 between tokens of the same region, -100 otherwise; on
    ``device`` (default: the default device; computed on the CPU, the last few grids cached)."""
    if h % window or w % window:
        raise ValueError(f"shift_window_mask: grid {h}x{w} is not a multiple of the window {window}")
    return _shift_window_mask(h, w, window, shift).to(device or torch.get_default_device(), copy=True)


@tensor_cache(maxsize=4)
def _shift_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    # Built on the CPU (constants; many tiny ops) and copied to the device asked for.
    labels = _region(h, window, shift)[:, None] * 3 + _region(w, window, shift)[None, :]
    labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.where(differ, torch.tensor(MASK_VALUE, device="cpu"), torch.tensor(0.0, device="cpu"))


def project_qkv(x: torch.Tensor, attn: nn.Module, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q(x), k(x), v(x)`` of ``attn``'s three ``Linear`` layers ``q``, ``k``, ``v`` for ``(B, nW, N, C)``
    windows, each as a contiguous ``(B, nW, heads, N, d)``.

    MindCV's three ``Dense`` layers are applied as one matrix product with their weights stacked
    (as timm's fused qkv), and the heads split off with one copy. After :func:`fuse_qkv` (the
    inference path) ``attn.qkv`` holds the stacked layer and is used as it is.
    """
    qkv = attn.qkv(x) if attn.qkv is not None else F.linear(x, *_stacked_qkv(attn))
    b, nw, n, _ = x.shape
    qkv = qkv.view(b, nw, n, 3, num_heads, -1).permute(3, 0, 1, 4, 2, 5).contiguous()
    return qkv.unbind(0)


def _stacked_qkv(attn: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``attn.q``, ``attn.k``, ``attn.v`` as one weight and bias (zeros for a layer without bias; None if
    none has one)."""
    linears = (attn.q, attn.k, attn.v)
    weight = torch.cat([lin.weight for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    return weight, torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias
                              for lin in linears])


@torch.no_grad()
def fuse_qkv(attn: nn.Module) -> None:
    """Replace ``attn``'s ``q``, ``k``, ``v`` layers by one stacked ``attn.qkv`` layer (the weights are
    concatenated once instead of on every forward); :func:`project_qkv` then uses it."""
    weight, bias = _stacked_qkv(attn)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    fused.weight.copy_(weight)
    if bias is not None:
        fused.bias.copy_(bias)
    fused.requires_grad_(attn.q.weight.requires_grad)
    del attn.q, attn.k, attn.v
    attn.qkv = fused


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T * scale + bias + mask) v`` over windows, by ``F.scaled_dot_product_attention``.

    ``q, k, v``: ``(B, nW, heads, N, d)`` (contiguous: then the 4-D layouts below are views);
    ``bias``: ``(heads, N, N)``; ``mask``: ``(nW, N, N)`` or None. Returns ``(B, nW, N, heads * d)``.
    The inputs are laid out as 4-D batches whose additive mask broadcasts over the batch
    (``(B * nW, heads)`` with the bias alone, ``(B, nW * heads)`` with bias + mask), which keeps
    PyTorch's fused CPU kernel (5-D inputs fall back to the unfused one).
    """
    b, nw, h, n, d = q.shape
    if mask is None:
        shape, attn_mask = (b * nw, h, n, d), bias[None]
    else:
        shape, attn_mask = (b, nw * h, n, d), (bias[None] + mask[:, None]).reshape(1, nw * h, n, n)
    q, k, v = (t.reshape(shape) for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p, scale=scale)
    return x.view(b, nw, h, n, d).transpose(2, 3).reshape(b, nw, n, h * d)


class ShiftMaskCache:
    """Shift masks of the grids met in forward, computed on first use and kept per device (a
    plain object, so nothing enters ``state_dict``); the oldest sizes are dropped beyond ``max_sizes``."""

    def __init__(self, window: int, shift: int, max_sizes: int = 4):
        self.window, self.shift, self.max_sizes = window, shift, max_sizes
        self._masks: "dict[tuple, torch.Tensor]" = {}

    def __call__(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, device)
        mask = self._masks.get(key)
        if mask is None:
            while len(self._masks) >= self.max_sizes:
                del self._masks[next(iter(self._masks))]
            mask = shift_window_mask(h, w, self.window, self.shift, device=device)
            if cacheable(mask):  # never a fake tensor from torch.export / torch.compile
                self._masks[key] = mask
        return mask


class PatchEmbed(nn.Module):
    """A ``patch x patch`` stride-``patch`` conv to ``(B, H, W, C)`` tokens, then LayerNorm; inputs
    whose sides are not multiples of the patch are zero-padded at the bottom/right first
    (MindCV's conv pads nothing: at multiples of the patch this is its computation)."""

    def __init__(self, image_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_eps: Optional[float] = 1e-5):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.patch_size = patch_size
        self.patches_resolution = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if norm_eps is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, -w % p, 0, -h % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class SwinStages(nn.Module):
    """The stage loop Swin and Swin V2 share: ``patch_embed``, ``pos_drop``, ``layers[i]`` (``blocks``
    then ``downsample``), a final ``norm`` on ``(B, H, W, C)`` tokens and a head named by
    ``head_name``. One path serves the logits (``forward_features``) and the levels
    (``forward_levels``: the NCHW ends of the requested stages, nothing computed past the deepest)."""

    head_name = "head"

    def _run_stages(self, x: torch.Tensor, take: FrozenSet[int], deepest: int
                    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Patch embedding and stages 0..deepest; the ``(B, H, W, C)`` ends of the stages in ``take``,
        and the last stage's end."""
        x = self.pos_drop(self.patch_embed(x))
        feats = []
        for i, layer in enumerate(self.layers[:deepest + 1]):
            for blk in layer.blocks:
                x = blk(x)
            if i in take:
                feats.append(x)
            if i < deepest:
                x = layer.downsample(x)
        return feats, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending) as NCHW maps, computing nothing past the deepest."""
        take, deepest = take_levels(indices, len(self.feature_info))
        feats, _ = self._run_stages(x, take, deepest)
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats]

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the head and everything after the deepest stage in ``indices`` (its PatchMerging too)."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.norm
        delattr(self, self.head_name)
        del self.layers[deepest + 1:]
        self.layers[deepest].downsample = None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _, x = self._run_stages(x, frozenset(), len(self.layers) - 1)
        return self.norm(x).mean(dim=(1, 2))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
