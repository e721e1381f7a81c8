"""Swin Transformer (V1), with MindCV's module tree, parameter names and buffers.

`Swin Transformer: Hierarchical Vision Transformer using Shifted Windows
<https://arxiv.org/abs/2103.14030>`_. A 4x4 patch embedding and four stages of
window attention blocks (every second block shifts the windows by half a
window); each of the first three stages ends with a PatchMerging (2x2 tokens to
one, channels doubled), which MindCV keeps inside the stage (``layers.i.downsample``).

MindCV details kept here: GELU is MindSpore's tanh approximation; the block,
patch-embedding and final LayerNorms use eps 1e-5, PatchMerging's MindSpore's
default 1e-7; q, k and v are three ``Dense`` layers (applied here as one product of
their stacked weights, then ``F.scaled_dot_product_attention`` with bias + mask as
its additive mask); the checkpoint stores the
one-hot ``relative_bias.index`` (N² x (2w-1)²) of every block and the
``attn_mask`` (1, nW, 1, N, N) of every shifted block, registered here as
buffers under the same names, at the native size.

``feature_info``: the end of each stage's blocks, ``layers.i.blocks.{last}``
(96, 192, 384, 768 channels at strides 4, 8, 16, 32 for swin_tiny); the
stage's PatchMerging belongs to the next level. Features and logits come from
one loop (:meth:`SwinTransformer._run_stages`).

Any input size: the input is zero-padded at the bottom/right to a multiple of
the patch, every map to a multiple of its window (after the LayerNorm, then
shifted, as the official Swin detection code does) and to an even size before a
PatchMerging, so level i has ``ceil(size / stride)`` pixels. The shift masks of
other grids are computed on first use (a small cache per block, not in
``state_dict``); at the native size the registered ``attn_mask`` buffers are
used and nothing is padded, so the native size computes exactly MindCV's
function. Window sizes and shifts are those MindCV builds at the native size
(swin_tiny's last stage, 7x7 at 224 px, has one window and never shifts), as
timm does with ``strict_img_size=False``.

Checkpoint names: MindCV appends the stages to an empty ``CellList``, so its
checkpoints name stage 0 ``0.blocks.{j}`` / ``0.downsample`` and stage i > 0
``0.blocks.{i}.blocks.{j}`` / ``0.blocks.{i}.downsample``; the cfg's
``mindcv_renames`` map them (and accept the dotted ``layers.i`` names).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers.constants import tensor_cache
from ..layers.drop_path import DropPath
from ..layers.init import init_weights, trunc_normal
from ..layers.windows import (SwinStages, Mlp, PatchEmbed, ShiftMaskCache, pad_to_multiple, padded_size,
                              project_qkv, fuse_qkv, relative_position_index, shift_window_mask, window_attention,
                              window_partition, window_reverse)
from ..registry import register_model

__all__ = ["SwinTransformer", "SwinTransformerBlock", "WindowAttention", "PatchMerging"]


@tensor_cache()
def _one_hot_index(window: int) -> torch.Tensor:
    # Constants are built once on the CPU and copied to the model's device.
    return F.one_hot(relative_position_index(window, device="cpu").flatten(), (2 * window - 1) ** 2).float()


class RelativeBias(nn.Module):
    """The learned relative position bias of a window: ``(heads, N, N)`` from a ``(2w-1)², heads`` table.

    ``index`` is MindCV's one-hot form of the relative position index, kept
    because MindCV's checkpoints store it; the bias is gathered with the integer
    index, which gives exactly what MindCV's one-hot matmul gives.
    """

    def __init__(self, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        # MindCV draws the table from N(0, 1).
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size).flatten(),
                             persistent=False)
        for name, tensor in self.native_buffers().items():
            self.register_buffer(name, tensor)

    def native_buffers(self, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """The buffers MindCV's checkpoint stores for this module, computed, on ``device`` (default: the
        default one)."""
        return {"index": _one_hot_index(self.window_size).to(device or torch.get_default_device(), copy=True)}

    def forward(self) -> torch.Tensor:
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(n, n, -1).permute(2, 0, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias and an optional
    shift mask; ``softmax(q k^T / sqrt(d) + bias + mask) v`` by ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_bias = RelativeBias(window_size, num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
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
        x = window_attention(q, k, v, self.relative_bias(), mask, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """LN -> (shifted) window attention -> residual; LN -> MLP -> residual, on ``(B, H, W, C)``.

    ``input_resolution`` is the native token grid: MindCV shrinks the window to
    it (without shifting) when it is not larger than the window, and stores the
    shift mask of that grid.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            shift_size, window_size = 0, min(self.input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
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
        mask = shift_window_mask(*self.native_grid, self.window_size, self.shift_size, device=device)
        return {"attn_mask": mask[None, :, None]}  # MindCV's (1, nW, 1, N, N)

    def _mask(self, hp: int, wp: int, device: torch.device) -> Optional[torch.Tensor]:
        if not self.shift_size:
            return None
        if (hp, wp) == self.native_grid:
            return self.attn_mask[0, :, 0]  # the checkpoint's buffer
        return self._masks(hp, wp, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = pad_to_multiple(self.norm1(x), ws)
        hp, wp = x.shape[1], x.shape[2]
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(window_partition(x, ws), self._mask(hp, wp, x.device))
        x = window_reverse(x, ws, hp, wp)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if hp != h or wp != w:
            x = x[:, :h, :w]
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, then a
    linear map to twice the channels; odd maps are zero-padded at the bottom/right first."""

    def __init__(self, input_resolution: Tuple[int, int], dim: int):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-7)  # MindSpore's default epsilon: MindCV passes none here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = pad_to_multiple(x, 2)
        h, w = x.shape[1], x.shape[2]
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks (odd ones shifted), then a PatchMerging unless it is the last."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] = (), downsample: bool = False):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[i] if drop_path else 0.0)
            for i in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformer(SwinStages):
    """Swin Transformer classifier; ``feature_info``: ``layers.i.blocks.{last}`` at strides 4..32.

    Args:
        image_size: the native input size (MindCV builds the windows and masks for it).
        patch_size, in_channels, num_classes, embed_dim: as named.
        depths, num_heads: blocks and attention heads per stage.
        window_size: the attention window (shrunk to a stage's grid where that is smaller).
        mlp_ratio, qkv_bias: MLP width factor; biases of q, k, v.
        drop_rate, attn_drop_rate, drop_path_rate: dropout rates (identity in eval).
        patch_norm: LayerNorm after the patch embedding.
    """

    head_name = "classifier"

    def __init__(self, image_size: int = 224, patch_size: int = 4, in_channels: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, patch_norm: bool = True):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformer: depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, embed_dim, 1e-5 if patch_norm else None)
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
                                          downsample=i < self.num_layers - 1))
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"layers.{i}.blocks.{depth - 1}"))
            reduction *= 2
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, linear=trunc_normal(0.02, -2.0, 2.0))


def _create_swin(variant: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    return build_model_with_cfg(SwinTransformer, pretrained, default_cfg=default_cfgs[variant],
                                **{**vars(model_cfgs[variant]), **kwargs})


def _from_timm(variant: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's Swin weights under our names: fused qkv split into q, k, v; timm's ``layers.i.downsample``
    (at the start of stage i) is our ``layers.{i-1}.downsample``; ``head.fc`` is ``classifier``. timm
    does not save the constant buffers MindCV's checkpoints hold; they are computed for ``variant``.
    A state dict without timm's fused ``qkv`` is returned unchanged."""
    if not any(".attn.qkv." in k for k in state_dict):
        return dict(state_dict)
    out: Dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
            key = ".".join(["layers", str(int(parts[1]) - 1), *parts[2:]])
        elif key.startswith("head.fc."):
            key = "classifier." + key[len("head.fc."):]
        if key.endswith(("attn.relative_position_index", "attn_mask")):
            continue  # constants; ours are computed below
        if ".attn.qkv." in key:
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[key.replace(".attn.qkv.", f".attn.{name}.")] = part
            continue
        out[key.replace(".attn.relative_position_bias_table", ".attn.relative_bias.relative_position_bias_table")] = t
    with torch.device("meta"):
        model = SwinTransformer(**vars(model_cfgs[variant]))
    for prefix, module in model.named_modules():
        if isinstance(module, (RelativeBias, SwinTransformerBlock)):
            out.update({f"{prefix}.{k}": v for k, v in module.native_buffers("cpu").items()})
    return out


@dataclass(frozen=True)
class SwinCfg:
    """A variant's architecture (see :class:`SwinTransformer`)."""

    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int = 7
    image_size: int = 224
    drop_path_rate: float = 0.2


model_cfgs = dict(
    swin_tiny=SwinCfg(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
)

# timm models with the same parameters (timm fuses q, k, v). The computation differs: timm's GELU is the exact
# one (MindCV's the tanh approximation) and timm's PatchMerging LayerNorm eps is 1e-5 (MindCV's 1e-7).
_TIMM_TWINS = {"swin_tiny": "swin_tiny_patch4_window7_224"}

# MindSpore's parameter names of the stages (see the module docstring) -> ours; applied in order.
_MINDCV_RENAMES = (
    (r"^0\.blocks\.(\d+)\.(blocks|downsample)\.", r"layers.\1.\2."),
    (r"^0\.(blocks|downsample)\.", r"layers.0.\1."),
)


def _cfg(variant: str, url: str = "", **kwargs):
    size = model_cfgs[variant].image_size
    return dict(url=url, num_classes=1000, input_size=(3, size, size), first_conv="patch_embed.proj",
                classifier="classifier", fixed_input_size=True,
                size_note=f"MindCV's classifier runs only at {size} px (its window masks and merging reshapes are "
                          f"built for that grid); the feature model pads windows and runs at any size",
                timm_twin=_TIMM_TWINS[variant], timm_convert=partial(_from_timm, variant), **kwargs)


default_cfgs = generate_default_cfgs({
    "swin_tiny": _cfg("swin_tiny", "https://download.mindspore.cn/toolkits/mindcv/swin/swin_tiny-0ff2f96d.ckpt"),
}, timm_twins=_TIMM_TWINS, mindcv_renames=_MINDCV_RENAMES)


@register_model
def swin_tiny(pretrained: bool = False, **kwargs) -> SwinTransformer:
    return _create_swin("swin_tiny", pretrained, **kwargs)
