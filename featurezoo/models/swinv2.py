"""Swin Transformer V2, with MindCV's module tree, parameter names and buffers.

`Swin Transformer V2: Scaling Up Capacity and Resolution <https://arxiv.org/abs/2111.09883>`_.
Swin's layout (4x4 patch embedding, four stages of shifted-window attention,
PatchMerging inside each of the first three stages) with V2's changes: scaled
cosine attention (``cos(q, k) * exp(min(logit_scale, log 100))``), a
continuous relative position bias (an MLP on log-spaced coordinates, then
``16 * sigmoid``), residual post-norm (``x + norm(f(x))``), and PatchMerging
normalising after its linear map.

MindCV details kept here: GELU is MindSpore's tanh approximation; LayerNorm eps
1e-6 everywhere except PatchMerging's 1e-5; q and v have biases, k none (three
``Dense`` layers, applied here as one product of their stacked weights); q and k
are L2-normalised as MindSpore's ``L2Normalize`` (``x / sqrt(max(sum x², 1e-12))``);
the attention itself is ``F.scaled_dot_product_attention`` on the scaled q, with
bias + mask as its additive mask. The checkpoint stores each block's
``relative_coords_table`` and int32 ``relative_position_index`` and each
shifted block's ``attn_mask`` (nW, N, N): buffers here under the same names, at
the native size (256 px). At 256 px the last stage's 8x8 grid is one window, so
it never shifts; for window 16 the third stage's 16x16 grid too, and the last
stage's window shrinks to 8 (with its own 8x8 position tables).

``feature_info``, any input size, padding and checkpoint names: as Swin (see
:mod:`featurezoo.models.swin`): the end of each stage's blocks, at strides 4,
8, 16, 32; maps padded at the bottom/right to the patch, the window (then
shifted) and an even size before merging, with shift masks for the padded grid
computed on first use; native grids use the registered buffers and pad nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.constants import tensor_cache
from ..layers.drop_path import DropPath
from ..layers.init import he_uniform, init_weights, trunc_normal
from ..layers.windows import (SwinStages, Mlp, PatchEmbed, ShiftMaskCache, pad_to_multiple, padded_size,
                              project_qkv, fuse_qkv, relative_position_index, shift_window_mask, window_attention,
                              window_partition, window_reverse)
from ..registry import register_model

__all__ = ["SwinTransformerV2", "SwinTransformerBlock", "WindowCosineAttention", "LogSpacedCPB", "PatchMerging"]

_LN_EPS = 1e-6


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # MindSpore's L2Normalize(epsilon=1e-12): the epsilon bounds the squared norm.
    return x / torch.sqrt(x.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12))


@tensor_cache()
def _cpb_tables(window: int, pretrained_window: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The log-spaced relative coordinates (1, 2w-1, 2w-1, 2) and the int32 relative position index,
    computed as MindCV does (float64, then float32), once, on the CPU."""
    coords = torch.arange(-(window - 1), window, dtype=torch.float64, device="cpu")
    table = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), dim=-1)[None]
    table = table / ((pretrained_window or window) - 1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1) / math.log2(8)
    return table.float(), relative_position_index(window, device="cpu").int()


class LogSpacedCPB(nn.Module):
    """Continuous relative position bias: an MLP (2 -> 512 -> heads) on log-spaced relative
    coordinates, gathered to ``(heads, N, N)`` and mapped by ``16 * sigmoid``."""

    def __init__(self, window_size: int, num_heads: int, pretrained_window_size: int = 0):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.pretrained_window_size = pretrained_window_size
        self.cpb_mlp0 = nn.Linear(2, 512)
        self.cpb_act1 = nn.ReLU()
        self.cpb_mlp2 = nn.Linear(512, num_heads, bias=False)
        for name, tensor in self.native_buffers().items():
            self.register_buffer(name, tensor)

    def native_buffers(self, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """The buffers MindCV's checkpoint stores for this module, as MindCV computes them, on ``device``
        (default: the default one)."""
        device = device or torch.get_default_device()
        table, index = _cpb_tables(self.window_size, self.pretrained_window_size)
        return {"relative_coords_table": table.to(device, copy=True),
                "relative_position_index": index.to(device, copy=True)}

    def forward(self) -> torch.Tensor:
        n = self.window_size ** 2
        table = self.cpb_mlp2(self.cpb_act1(self.cpb_mlp0(self.relative_coords_table))).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1).long()].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)


class WindowCosineAttention(nn.Module):
    """Scaled cosine attention inside windows: ``softmax(cos(q, k) * scale_h + bias + mask) v``, by
    ``F.scaled_dot_product_attention`` on ``q * scale_h`` (``scale_h = exp(min(logit_scale_h, log 100))``)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, pretrained_window_size: int = 0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias = LogSpacedCPB(window_size, num_heads, pretrained_window_size)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.qkv: Optional[nn.Linear] = None  # set by reparameterize()

    def reparameterize(self) -> None:
        """The inference form: ``q``, ``k``, ``v`` stacked into one ``qkv`` layer (:func:`fuse_qkv`)."""
        fuse_qkv(self)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``(B, nW, N, C)`` windows; ``mask``: ``(nW, N, N)`` or None."""
        q, k, v = project_qkv(x, self, self.num_heads)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        x = window_attention(_l2_normalize(q) * scale, _l2_normalize(k), v, self.relative_position_bias(), mask, 1.0,
                             self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention -> LN -> residual; MLP -> LN -> residual (post-norm), on ``(B, H, W, C)``.

    ``input_resolution`` is the native token grid: MindCV shrinks the window to
    it (without shifting) when it is not larger than the window, and stores the
    shift mask of that grid.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, pretrained_window_size: int = 0):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            shift_size, window_size = 0, min(self.input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = WindowCosineAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop,
                                          pretrained_window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        # The grid the registered mask is for: the native one (padded to the window, where MindCV could not run).
        self.native_grid = tuple(padded_size(s, window_size) for s in self.input_resolution)
        self.register_buffer("attn_mask", None)
        for name, tensor in self.native_buffers().items():
            self.register_buffer(name, tensor)
        self._masks = ShiftMaskCache(window_size, shift_size)

    def native_buffers(self, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """The buffers MindCV's checkpoint stores for this block (the shift mask, if it shifts), computed, on
        ``device`` (default: the default one)."""
        if not self.shift_size:
            return {}
        return {"attn_mask": shift_window_mask(*self.native_grid, self.window_size, self.shift_size, device=device)}

    def _mask(self, hp: int, wp: int, device: torch.device) -> Optional[torch.Tensor]:
        if not self.shift_size:
            return None
        if (hp, wp) == self.native_grid:
            return self.attn_mask  # the checkpoint's buffer
        return self._masks(hp, wp, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = pad_to_multiple(x, ws)
        hp, wp = x.shape[1], x.shape[2]
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(window_partition(x, ws), self._mask(hp, wp, x.device))
        x = window_reverse(x, ws, hp, wp)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if hp != h or wp != w:
            x = x[:, :h, :w]
        x = shortcut + self.drop_path(self.norm1(x))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens concatenated (order (0,0), (1,0), (0,1), (1,1)), a linear map to twice
    the channels, then LayerNorm; odd maps are zero-padded at the bottom/right first."""

    def __init__(self, input_resolution: Tuple[int, int], dim: int):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = pad_to_multiple(x, 2)
        h, w = x.shape[1], x.shape[2]
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.norm(self.reduction(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks (odd ones shifted), then a PatchMerging unless it is the last."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] = (), downsample: bool = False, pretrained_window_size: int = 0):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[i] if drop_path else 0.0,
                                 pretrained_window_size=pretrained_window_size)
            for i in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformerV2(SwinStages):
    """Swin Transformer V2 classifier; ``feature_info``: ``layers.i.blocks.{last}`` at strides 4..32.

    Args:
        image_size: the native input size (MindCV builds the windows and masks for it).
        patch_size, in_channels, num_classes, embed_dim: as named.
        depths, num_heads: blocks and attention heads per stage.
        window_size: the attention window (shrunk to a stage's grid where that is smaller).
        mlp_ratio, qkv_bias: MLP width factor; biases of q and v.
        drop_rate, attn_drop_rate, drop_path_rate: dropout rates (identity in eval).
        patch_norm: LayerNorm after the patch embedding.
        pretrained_window_sizes: per stage, the window the position coordinates are normalised by (0: its own).
    """

    head_name = "head"

    def __init__(self, image_size: int = 256, patch_size: int = 4, in_channels: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, patch_norm: bool = True,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0)):
        super().__init__()
        if not len(depths) == len(num_heads) == len(pretrained_window_sizes):
            raise ValueError(f"SwinTransformerV2: depths {list(depths)}, num_heads {list(num_heads)} and "
                             f"pretrained_window_sizes {list(pretrained_window_sizes)} differ in length")
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, embed_dim,
                                      _LN_EPS if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]  # np.linspace
        self.feature_info: List[dict] = []
        self.layers = nn.ModuleList()
        res, reduction = self.patch_embed.patches_resolution, patch_size
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            stage_res = (res[0] // 2 ** i, res[1] // 2 ** i)
            self.layers.append(BasicLayer(dim, stage_res, depth, heads, window_size, mlp_ratio, qkv_bias, drop_rate,
                                          attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                          downsample=i < self.num_layers - 1,
                                          pretrained_window_size=pretrained_window_sizes[i]))
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"layers.{i}.blocks.{depth - 1}"))
            reduction *= 2
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.norm = nn.LayerNorm(self.num_features, eps=_LN_EPS)
        init_weights(self, conv=he_uniform, linear=trunc_normal(0.02, -2.0, 2.0))


def _create_swinv2(variant: str, pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return build_model_with_cfg(SwinTransformerV2, pretrained, default_cfg=default_cfgs[variant],
                                **{**vars(model_cfgs[variant]), **kwargs})


def _from_timm(variant: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's Swin V2 weights under our names: the fused (bias-free) qkv split into q, k, v, with
    ``q_bias``/``v_bias`` as q's and v's biases; ``cpb_mlp.0/2`` are ``relative_position_bias.cpb_mlp0/2``;
    timm's ``layers.i.downsample`` (at the start of stage i) is our ``layers.{i-1}.downsample``; ``head.fc``
    is ``head``. timm does not save the constant buffers MindCV's checkpoints hold; they are computed for
    ``variant``. A state dict without timm's fused ``qkv`` is returned unchanged."""
    if not any(".attn.qkv." in k for k in state_dict):
        return dict(state_dict)
    renames = ((".attn.q_bias", ".attn.q.bias"), (".attn.v_bias", ".attn.v.bias"),
               (".attn.cpb_mlp.0.", ".attn.relative_position_bias.cpb_mlp0."),
               (".attn.cpb_mlp.2.", ".attn.relative_position_bias.cpb_mlp2."))
    out: Dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
            key = ".".join(["layers", str(int(parts[1]) - 1), *parts[2:]])
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        if key.endswith(("attn.relative_position_index", "attn.relative_coords_table", "attn.k_bias", "attn_mask")):
            continue  # constants (k_bias is zeros: MindCV's k has no bias); ours are computed below
        if ".attn.qkv." in key:
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[key.replace(".attn.qkv.", f".attn.{name}.")] = part
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = t
    with torch.device("meta"):
        model = SwinTransformerV2(**vars(model_cfgs[variant]))
    for prefix, module in model.named_modules():
        if isinstance(module, (LogSpacedCPB, SwinTransformerBlock)):
            out.update({f"{prefix}.{k}": v for k, v in module.native_buffers("cpu").items()})
    return out


@dataclass(frozen=True)
class SwinV2Cfg:
    """A variant's architecture (see :class:`SwinTransformerV2`)."""

    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    image_size: int = 256


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
model_cfgs = dict(
    swinv2_tiny_window8=SwinV2Cfg(**_TINY, window_size=8),
    swinv2_tiny_window16=SwinV2Cfg(**_TINY, window_size=16),
    swinv2_small_window8=SwinV2Cfg(**_SMALL, window_size=8),
    swinv2_small_window16=SwinV2Cfg(**_SMALL, window_size=16),
    swinv2_base_window8=SwinV2Cfg(**_BASE, window_size=8),
    swinv2_base_window16=SwinV2Cfg(**_BASE, window_size=16),
)

# timm models with the same parameters (timm fuses q, k, v). The computation differs: timm's GELU is the exact
# one (MindCV's the tanh approximation) and timm's LayerNorm eps is 1e-5 (MindCV's 1e-6 outside PatchMerging).
_TIMM_TWINS = {name: f"{name}_256" for name in model_cfgs}

# MindSpore's parameter names of the stages (see featurezoo.models.swin) -> ours; applied in order.
_MINDCV_RENAMES = (
    (r"^0\.blocks\.(\d+)\.(blocks|downsample)\.", r"layers.\1.\2."),
    (r"^0\.(blocks|downsample)\.", r"layers.0.\1."),
)


def _cfg(variant: str, url: str = "", **kwargs):
    size = model_cfgs[variant].image_size
    return dict(url=url, num_classes=1000, input_size=(3, size, size), first_conv="patch_embed.proj",
                classifier="head", fixed_input_size=True,
                size_note=f"MindCV's classifier runs only at {size} px (its window masks and merging reshapes are "
                          f"built for that grid); the feature model pads windows and runs at any size",
                timm_twin=_TIMM_TWINS[variant], timm_convert=partial(_from_timm, variant), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/swinv2"
default_cfgs = generate_default_cfgs({
    "swinv2_tiny_window8": _cfg("swinv2_tiny_window8", f"{_MS}/swinv2_tiny_window8-3ef8b787.ckpt"),
    "swinv2_tiny_window16": _cfg("swinv2_tiny_window16"),
    "swinv2_small_window8": _cfg("swinv2_small_window8"),
    "swinv2_small_window16": _cfg("swinv2_small_window16"),
    "swinv2_base_window8": _cfg("swinv2_base_window8"),
    "swinv2_base_window16": _cfg("swinv2_base_window16"),
}, timm_twins=_TIMM_TWINS, mindcv_renames=_MINDCV_RENAMES)


@register_model
def swinv2_tiny_window8(pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return _create_swinv2("swinv2_tiny_window8", pretrained, **kwargs)


@register_model
def swinv2_tiny_window16(pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return _create_swinv2("swinv2_tiny_window16", pretrained, **kwargs)


@register_model
def swinv2_small_window8(pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return _create_swinv2("swinv2_small_window8", pretrained, **kwargs)


@register_model
def swinv2_small_window16(pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return _create_swinv2("swinv2_small_window16", pretrained, **kwargs)


@register_model
def swinv2_base_window8(pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return _create_swinv2("swinv2_base_window8", pretrained, **kwargs)


@register_model
def swinv2_base_window16(pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    return _create_swinv2("swinv2_base_window16", pretrained, **kwargs)
