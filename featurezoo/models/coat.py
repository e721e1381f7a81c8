"""CoaT and CoaT-Lite, with MindCV's module tree and parameter names.

`Co-Scale Conv-Attentional Image Transformers <https://arxiv.org/abs/2104.06399>`_.
Four serial stages (a patch embedding of stride 4, then 2, 2, 2; a class token
prepended at index 0 of each stage's tokens; serial blocks of factorised
attention). CoaT-Lite classifies from stage 4's class token; CoaT adds parallel
blocks that update stages 2-4 together, passing the four stages' tokens as a
4-tuple and exchanging information between them by bilinear resampling, and
classifies from a 1x1 convolution over the three class tokens.

MindCV details kept here: exact (erf) GELU; LayerNorm eps 1e-6 in the blocks
and final norms, 1e-5 in the patch embeddings; separate ``q``/``k``/``v``
projections; the serial block's attention residual adds to its input *before*
the convolutional position encoding (``x + attn(norm1(cpe(x)))``, timm adds to
``cpe(x)``); the parallel blocks resample with ``align_corners=True`` to the
other stage's grid (timm: by a scale factor, ``align_corners=False``); the
aggregation "Conv1d" is MindSpore's, a 1x1 Conv2d with a ``(1, 3, 1, 1)``
weight. The factorised attention is computed as ``q @ (softmax(k)^T v)``
(timm's order; MindCV forms the N x N product ``q @ softmax(k)^T`` first, the
same function, which at detector sizes would not fit in memory).

Shared modules: each stage's convolutional position encoding ``cpe{i}`` and
relative position encoding ``crpe{i}`` serve all of that stage's blocks (and
the parallel blocks); each parallel block's ``mlp2`` also serves as its
``mlp3``/``mlp4``. Each is registered once, at MindCV's module path
(``cpe1``, ``crpe1``, ``parallel_blocks.0.mlp2``) and handed to the blocks at
call time, so parameters, names and count equal MindCV's. MindSpore saves a
shared parameter under its name in the last container that adopted it
(``serial_blocks1.0.cpe.proj.weight``,
``serial_blocks1.0.factoratt_crpe.crpe.conv_list.0.weight``, for CoaT
``parallel_blocks.0.factoratt_crpe2.crpe...``); ``mindcv_renames`` maps those
onto the module paths (both forms load).

``feature_info`` (one entry per stage, tokens without the class token as NCHW
maps): CoaT-Lite ``serial_blocks1..4`` at strides 4/8/16/32; CoaT
``serial_blocks1`` at stride 4 (the parallel blocks pass stage 1 through), then
stages 2-4 as the last parallel block returns them. A level 1-3 of CoaT needs
every serial stage and all parallel blocks; level 0 needs stage 1 only.

Input sizes: MindCV fixes the token grids at 224 px; there are no position
embeddings, so the same function runs at any size of at least 32 px (smaller
inputs leave stage 4 without tokens: a ``ValueError``). The patch embeddings
are unpadded convolutions with kernel = stride, so a map has
``floor(size / reduction)`` tokens per side (the right/bottom remainder of a
size that is not a multiple of 32 is not seen by the deeper stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.drop_path import DropPath
from ..layers.fx_calls import fx_call
from ..layers.init import init_weights, trunc_normal
from ..layers.tokens import tokens_to_nchw
from ..layers.mlp import Mlp
from ..registry import register_model

__all__ = ["CoaT", "SerialBlock", "ParallelBlock", "FactorAttConvRelPosEnc", "ConvRelPosEnc", "ConvPosEnc"]

_LN_EPS = 1e-6
_PATCH_LN_EPS = 1e-5
HW = Tuple[int, int]


def _ln(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=_LN_EPS)


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


@fx_call
def check_stage_input(x: torch.Tensor, image: torch.Tensor, patch: int, stage: int, stride: int,
                      parallel: bool) -> torch.Tensor:
    """``x`` (stage ``stage``'s input map), or a ``ValueError`` when it is smaller than the stage's ``patch``:
    the ``image`` is then too small for the stage's ``stride``."""
    if min(x.shape[2:]) < patch:
        h, w = image.shape[2:]
        raise ValueError(f"CoaT: a {h}x{w} input leaves stage {stage} (stride {stride}) without "
                         f"tokens: it needs at least {stride} px per side"
                         + (" (the parallel blocks need all four stages)" if parallel else ""))
    return x


class PatchEmbed(nn.Module):
    """Unpadded conv with kernel = stride, then LayerNorm over the tokens; returns (tokens, grid)."""

    def __init__(self, in_chs: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=_PATCH_LN_EPS)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, HW]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: image tokens + depthwise 3x3 conv of them; the class token passes."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        cls_token, img = x[:, :1], x[:, 1:]
        feat = img.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])
        img = (self.proj(feat) + feat).flatten(2).transpose(1, 2)
        return torch.cat((cls_token, img), dim=1)


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding: ``q * dwconv(v)`` per head group, windows 3/5/7
    over 2/3/3 heads; zero at the class token."""

    def __init__(self, head_dim: int, num_heads: int, window: Sequence[Tuple[int, int]]):
        super().__init__()
        if sum(heads for _, heads in window) != num_heads:
            raise ValueError(f"ConvRelPosEnc: window head splits {list(window)} do not add up to {num_heads} heads")
        self.conv_list = nn.ModuleList()
        self.channel_splits = []
        for k, heads in window:
            chs = heads * head_dim
            self.conv_list.append(nn.Conv2d(chs, chs, k, padding=k // 2, groups=chs))
            self.channel_splits.append(chs)

    def forward(self, q: torch.Tensor, v: torch.Tensor, hw: HW) -> torch.Tensor:
        b, heads, _, ch = q.shape
        v_img = v[:, :, 1:].transpose(2, 3).reshape(b, heads * ch, hw[0], hw[1])
        parts = torch.split(v_img, self.channel_splits, dim=1)
        conv_v = torch.cat([conv(p) for conv, p in zip(self.conv_list, parts)], dim=1)
        conv_v = conv_v.reshape(b, heads, ch, hw[0] * hw[1]).transpose(2, 3)
        return F.pad(q[:, :, 1:] * conv_v, (0, 0, 1, 0))


class FactorAttConvRelPosEnc(nn.Module):
    """Factorised attention ``scale * q (softmax_N(k)^T v)`` plus the (shared) relative position encoding,
    handed in as ``crpe`` at call time."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: HW, crpe: ConvRelPosEnc) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (lin(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        factor_att = q @ (k.softmax(dim=2).transpose(2, 3) @ v)
        x = self.scale * factor_att + crpe(q, v, hw)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class SerialBlock(nn.Module):
    """``x + attn(norm1(cpe(x)))`` (MindCV's residual skips the position encoding), then ``x + mlp(norm2(x))``.
    The stage's shared ``cpe`` and ``crpe`` are handed in at call time."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = _ln(dim)
        self.factoratt_crpe = FactorAttConvRelPosEnc(dim, num_heads, qkv_bias, drop)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = _ln(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, gelu_approximate="none")

    def forward(self, x: torch.Tensor, hw: HW, cpe: ConvPosEnc, crpe: ConvRelPosEnc) -> torch.Tensor:
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(cpe(x, hw)), hw, crpe))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _resample(x: torch.Tensor, hw: HW, out_hw: HW) -> torch.Tensor:
    """Tokens with a class token on grid ``hw`` -> on grid ``out_hw`` (bilinear, align_corners=True)."""
    img = tokens_to_nchw(x[:, 1:], hw)
    img = F.interpolate(img, size=out_hw, mode="bilinear", align_corners=True)
    return torch.cat((x[:, :1], img.flatten(2).transpose(1, 2)), dim=1)


# Stage (0-based) -> the stages whose resampled attention outputs MindCV adds to it, in MindCV's order.
_MIX_ORDER = {1: (2, 3), 2: (3, 1), 3: (2, 1)}


class ParallelBlock(nn.Module):
    """Stages 2-4 together: each attends within itself, the three attention outputs are summed across
    scales (resampled to each other's grids), then one MLP (``mlp2``, MindCV's ``mlp2 = mlp3 = mlp4``)
    serves all three. Stage 1 passes through. Takes and returns the 4-tuple of the stages' tokens."""

    def __init__(self, dims: Sequence[int], num_heads: int, mlp_ratios: Sequence[float], qkv_bias: bool = True,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not dims[1] == dims[2] == dims[3] or not mlp_ratios[1] == mlp_ratios[2] == mlp_ratios[3]:
            raise ValueError(f"ParallelBlock: stages 2-4 share one MLP and need equal widths and MLP ratios, "
                             f"got {list(dims)} and {list(mlp_ratios)}")
        for i in (2, 3, 4):
            self.add_module(f"norm1{i}", _ln(dims[i - 1]))
        for i in (2, 3, 4):
            self.add_module(f"factoratt_crpe{i}", FactorAttConvRelPosEnc(dims[i - 1], num_heads, qkv_bias, drop))
        self.drop_path = _drop_path(drop_path)
        for i in (2, 3, 4):
            self.add_module(f"norm2{i}", _ln(dims[i - 1]))
        self.mlp2 = Mlp(dims[1], int(dims[1] * mlp_ratios[1]), drop, gelu_approximate="none")

    def forward(self, xs: Tuple[torch.Tensor, ...], sizes: Sequence[HW], cpes: Sequence[ConvPosEnc],
                crpes: Sequence[ConvRelPosEnc]) -> Tuple[torch.Tensor, ...]:
        """``xs``, ``sizes``, ``cpes``, ``crpes``: per stage (0-based; stage 0's are not used)."""
        x = {s: cpes[s](xs[s], sizes[s]) for s in (1, 2, 3)}
        att = {s: getattr(self, f"factoratt_crpe{s + 1}")(getattr(self, f"norm1{s + 1}")(x[s]), sizes[s], crpes[s])
               for s in (1, 2, 3)}
        for s, others in _MIX_ORDER.items():
            mixed = att[s]
            for o in others:
                mixed = mixed + _resample(att[o], sizes[o], sizes[s])
            x[s] = x[s] + self.drop_path(mixed)
        for s in (1, 2, 3):
            x[s] = x[s] + self.drop_path(self.mlp2(getattr(self, f"norm2{s + 1}")(x[s])))
        return xs[0], x[1], x[2], x[3]


class CoaT(nn.Module):
    """CoaT (``parallel_depth > 0``) or CoaT-Lite classifier.

    ``feature_info``: one entry per stage (see the module docstring).

    Args:
        embed_dims, serial_depths, mlp_ratios: per stage.
        parallel_depth: parallel blocks after the serial stages (0: CoaT-Lite).
        num_heads: attention heads in every stage.
        patch_size: stride of the first patch embedding (the others are 2).
        crpe_window: (window, heads) of the relative position encoding's convs.
        qkv_bias, drop_rate, drop_path_rate: as in MindCV (one drop-path rate for all blocks).
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, embed_dims: Sequence[int], serial_depths: Sequence[int], mlp_ratios: Sequence[float],
                 parallel_depth: int = 0, num_heads: int = 8, patch_size: int = 4,
                 crpe_window: Sequence[Tuple[int, int]] = ((3, 2), (5, 3), (7, 3)), qkv_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.num_stages = len(embed_dims)
        self.parallel_depth = parallel_depth
        self.feature_info = []
        chs, reduction = in_channels, 1
        for i, (dim, depth, ratio) in enumerate(zip(embed_dims, serial_depths, mlp_ratios), start=1):
            patch = patch_size if i == 1 else 2
            self.add_module(f"patch_embed{i}", PatchEmbed(chs, dim, patch))
            self.register_parameter(f"cls_token{i}", nn.Parameter(torch.zeros(1, 1, dim)))
            self.add_module(f"cpe{i}", ConvPosEnc(dim))
            self.add_module(f"crpe{i}", ConvRelPosEnc(dim // num_heads, num_heads, crpe_window))
            self.add_module(f"serial_blocks{i}", nn.ModuleList(
                SerialBlock(dim, num_heads, ratio, qkv_bias, drop_rate, drop_path_rate) for _ in range(depth)))
            chs, reduction = dim, reduction * patch
            label = f"serial_blocks{i}" if i == 1 or not parallel_depth else f"parallel_blocks:x{i}"
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=label))
        if parallel_depth:
            self.parallel_blocks = nn.ModuleList(
                ParallelBlock(embed_dims, num_heads, mlp_ratios, qkv_bias, drop_rate, drop_path_rate)
                for _ in range(parallel_depth))
            self.norm2 = _ln(embed_dims[1])
            self.norm3 = _ln(embed_dims[2])
        self.norm4 = _ln(embed_dims[3])
        if parallel_depth:
            # MindSpore's Conv1d(3, 1, 1) over the three class tokens: a Conv2d with a (1, 3, 1, 1) weight.
            self.aggregate = nn.Conv2d(3, 1, kernel_size=1)
        self.num_features = embed_dims[3]
        self.head = nn.Linear(embed_dims[3], num_classes)
        for i in range(1, self.num_stages + 1):
            nn.init.trunc_normal_(getattr(self, f"cls_token{i}"), std=0.02)
        # MindSpore's TruncatedNormal(0.02) cuts at +-2 (absolute), as torch's trunc_normal_ does by default.
        init_weights(self, linear=trunc_normal(0.02, -2.0, 2.0))

    def _stage_modules(self, i: int):
        return tuple(getattr(self, f"{n}{i}") for n in ("patch_embed", "cls_token", "cpe", "crpe", "serial_blocks"))

    def _stages(self, x: torch.Tensor, deepest: int) -> Tuple[List[torch.Tensor], List[HW]]:
        """Every stage's tokens (class token at 0) and grid, as far as level ``deepest`` needs: the serial
        stages up to it, or for CoaT's levels 1-3 all serial stages and the parallel blocks."""
        image = x
        run_parallel = self.parallel_depth > 0 and deepest > 0
        num_serial = self.num_stages if run_parallel else deepest + 1
        xs: List[torch.Tensor] = []
        sizes: List[HW] = []
        for i in range(1, num_serial + 1):
            patch_embed, cls_token, cpe, crpe, blocks = self._stage_modules(i)
            if i > 1:
                x = tokens_to_nchw(xs[-1][:, 1:], sizes[-1])
            x, hw = patch_embed(check_stage_input(x, image, patch_embed.proj.stride[0], i,
                                                  self.feature_info[i - 1]["reduction"], run_parallel))
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            for block in blocks:
                x = block(x, hw, cpe, crpe)
            xs.append(x)
            sizes.append(hw)
        if run_parallel:
            cpes = [getattr(self, f"cpe{i}") for i in range(1, 5)]
            crpes = [getattr(self, f"crpe{i}") for i in range(1, 5)]
            out = tuple(xs)
            for block in self.parallel_blocks:
                out = block(out, sizes, cpes, crpes)
            xs = list(out)
        return xs, sizes

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending) as NCHW maps without the class token,
        computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        xs, sizes = self._stages(x, deepest)
        return [tokens_to_nchw(xs[i][:, 1:], sizes[i]) for i in sorted(take)]

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the classifier (final norms, aggregation, head) and every stage the deepest level of
        ``indices`` does not need."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("norm2", "norm3", "norm4", "aggregate", "head"):
            if hasattr(self, name):
                delattr(self, name)
        if self.parallel_depth and deepest > 0:
            return
        if self.parallel_depth:
            del self.parallel_blocks
        for i in range(deepest + 2, self.num_stages + 1):
            for name in ("patch_embed", "cls_token", "cpe", "crpe", "serial_blocks"):
                delattr(self, f"{name}{i}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (MindCV's ``forward_features``): stage 4's normed class token (CoaT-Lite),
        or the aggregation of stages 2-4's normed class tokens (CoaT)."""
        xs, _ = self._stages(x, len(self.feature_info) - 1)
        if not self.parallel_depth:
            return self.norm4(xs[3])[:, 0]
        cls_tokens = torch.cat([norm(t)[:, :1] for norm, t in zip((self.norm2, self.norm3, self.norm4), xs[1:])],
                               dim=1)
        return self.aggregate(cls_tokens.unsqueeze(2)).flatten(1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_coat(variant: str, pretrained: bool = False, **kwargs) -> CoaT:
    return build_model_with_cfg(CoaT, pretrained, default_cfg=default_cfgs[variant], **vars(model_cfgs[variant]),
                                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/coat"
_SIZE_NOTE = ("MindCV fixes CoaT's token grids at 224 px, so the classifier is checked there only; there are no "
              "position embeddings, and any size of at least 32 px runs (stage 4 needs one token). Patch embeddings "
              "are unpadded k=s convs: maps are floor(size / reduction)")


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
                first_conv="patch_embed1.proj", classifier="head", fixed_input_size=True,
                min_input_size=(3, 32, 32), size_note=_SIZE_NOTE,
                valid_padding="the patch embeddings are unpadded convs with kernel = stride (4, then 2): each map "
                              "has floor(size / reduction) tokens per side", **kwargs)


# Where MindSpore saves the shared modules (see the module docstring) -> their module paths.
_MINDCV_RENAMES = (
    (r"^serial_blocks(\d)\.0\.cpe\.", r"cpe\1."),
    (r"^serial_blocks(\d)\.0\.factoratt_crpe\.crpe\.", r"crpe\1."),
    (r"^parallel_blocks\.0\.factoratt_crpe(\d)\.crpe\.", r"crpe\1."),
)


def _from_timm(state: dict) -> dict:
    """timm's coat_* state dict under our names: its fused ``qkv`` split into ``q``/``k``/``v``, its
    Conv1d ``aggregate`` weight given MindSpore's (1, 3, 1, 1) shape, and the aliases under which
    PyTorch's ``state_dict`` repeats timm's shared modules (``serial_blocks*.cpe``, ``*.crpe``,
    ``mlp3``/``mlp4``) dropped: their tensors are ``cpe{i}``'s, ``crpe{i}``'s and ``mlp2``'s."""
    out = {}
    for name, t in state.items():
        if (name.startswith(("serial_blocks", "parallel_blocks")) and (".cpe." in name or ".crpe." in name)) \
                or ".mlp3." in name or ".mlp4." in name:
            continue
        if ".qkv." in name:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[name.replace(".qkv.", f".{part}.")] = chunk.clone()
        elif name == "aggregate.weight":
            out[name] = t.unsqueeze(-1)
        else:
            out[name] = t
    return out


_TIMM_TWINS = {n: n for n in ("coat_tiny", "coat_mini", "coat_small", "coat_lite_tiny", "coat_lite_mini",
                              "coat_lite_small", "coat_lite_medium")}

default_cfgs = generate_default_cfgs({
    # MindCV's coat_tiny builder uses coat_mini's cfg (and URL); its own coat_tiny URL is this one.
    "coat_tiny": _cfg(f"{_MS}/coat_tiny-071cb792.ckpt"),
    "coat_mini": _cfg(f"{_MS}/coat_mini-57c5bce7.ckpt"),
    "coat_small": _cfg(),
    "coat_lite_tiny": _cfg(f"{_MS}/coat_lite_tiny-fa7bf894.ckpt"),
    "coat_lite_mini": _cfg(f"{_MS}/coat_lite_mini-55a52f05.ckpt"),
    "coat_lite_small": _cfg(),
    "coat_lite_medium": _cfg(),
}, timm_twins=_TIMM_TWINS, timm_convert=_from_timm, mindcv_renames=_MINDCV_RENAMES)


@dataclass(frozen=True)
class CoaTCfg:
    embed_dims: Tuple[int, int, int, int]
    serial_depths: Tuple[int, int, int, int]
    mlp_ratios: Tuple[int, int, int, int]
    parallel_depth: int = 0


model_cfgs = dict(
    coat_tiny=CoaTCfg((152, 152, 152, 152), (2, 2, 2, 2), (4, 4, 4, 4), parallel_depth=6),
    coat_mini=CoaTCfg((152, 216, 216, 216), (2, 2, 2, 2), (4, 4, 4, 4), parallel_depth=6),
    coat_small=CoaTCfg((152, 320, 320, 320), (2, 2, 2, 2), (4, 4, 4, 4), parallel_depth=6),
    coat_lite_tiny=CoaTCfg((64, 128, 256, 320), (2, 2, 2, 2), (8, 8, 4, 4)),
    coat_lite_mini=CoaTCfg((64, 128, 320, 512), (2, 2, 2, 2), (8, 8, 4, 4)),
    coat_lite_small=CoaTCfg((64, 128, 320, 512), (3, 4, 6, 3), (8, 8, 4, 4)),
    coat_lite_medium=CoaTCfg((128, 256, 320, 512), (3, 6, 10, 8), (4, 4, 4, 4)),
)


@register_model
def coat_tiny(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_tiny", pretrained, **kwargs)


@register_model
def coat_mini(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_mini", pretrained, **kwargs)


@register_model
def coat_small(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_small", pretrained, **kwargs)


@register_model
def coat_lite_tiny(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_lite_tiny", pretrained, **kwargs)


@register_model
def coat_lite_mini(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_lite_mini", pretrained, **kwargs)


@register_model
def coat_lite_small(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_lite_small", pretrained, **kwargs)


@register_model
def coat_lite_medium(pretrained: bool = False, **kwargs) -> CoaT:
    return _create_coat("coat_lite_medium", pretrained, **kwargs)
