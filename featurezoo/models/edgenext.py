"""EdgeNeXt, with MindCV's module tree and parameter names.

`EdgeNeXt: Efficiently Amalgamated CNN-Transformer Architecture for Mobile
Vision Applications <https://arxiv.org/abs/2206.10589>`_: a ConvNeXt-like
four-stage NCHW pyramid whose stages 1-3 end with a split depthwise-transposed
attention (SDTA) block: multi-scale depthwise convs over channel groups, then
cross-covariance attention (XCA, attention between channels, linear in the
number of tokens) and an inverted bottleneck.

MindCV details kept here: the stem (k4 s4) and downsampling (k2 s2) convs use
MindSpore's ``same`` padding, so maps have ``ceil(size / reduction)`` pixels
at any size (timm pads nothing; the two agree where the size is a multiple of
32); every LayerNorm has eps 1e-6; GELU is exact; XCA normalises q and k
with MindSpore's ``L2Normalize``, ``x / sqrt(max(sum(x^2), 1e-4))`` (timm's
``F.normalize`` clamps the norm at 1e-12 instead); the Fourier position
encoding of stage 1's SDTA block is computed for the map it gets, so any
input size works.

``feature_info``: the end of each stage, ``stages.0`` .. ``stages.3`` at
reductions 4, 8, 16, 32; :meth:`EdgeNeXt.forward_levels` is the classifier's
own loop over ``downsample_layers`` and ``stages``.

Checkpoint names: MindCV fills its empty ``downsample_layers`` and ``stages``
CellLists by ``append``, and MindSpore then saves their parameters without
the list's name (``stages.1.0.dwconv.weight`` as ``0.1.0.dwconv.weight``,
``stages.0.1.norm.gamma`` as ``0.1.norm.gamma``, the stem conv as
``0.0.weight``). The module tree here keeps the paths MindCV's code declares;
the cfg's ``mindcv_renames`` map the saved names onto them (checked against
MindSpore's own pairing of module paths and saved names for all four
variants).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers import Conv2d
from ..layers.drop_path import DropPath
from ..layers.init import init_weights, trunc_normal
from ..registry import register_model

__all__ = ["EdgeNeXt", "ConvEncoder", "SDTAEncoder", "XCA", "PositionalEncodingFourier", "LayerNorm2d"]

_LN_EPS = 1e-6
_L2_EPS = 1e-4  # MindSpore's ops.L2Normalize default: x / sqrt(max(sum(x^2), eps))
_STEM_STRIDE = 4
_DOWNSAMPLE_STRIDE = 2


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (MindCV's ``LayerNorm(norm_axis=1)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).sum(dim=-1, keepdim=True).clamp_min(_L2_EPS).sqrt()


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine features of the normalised (row, column) of every pixel, projected by a 1x1 conv.

    ``forward(h, w)`` returns ``(1, dim, h, w)``; it depends only on the map size.
    """

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim
        self.dim = dim

    def forward(self, h: int, w: int) -> torch.Tensor:
        weight = self.token_projection.weight
        eps = 1e-6
        y = torch.arange(1, h + 1, dtype=torch.float32, device=weight.device)
        x = torch.arange(1, w + 1, dtype=torch.float32, device=weight.device)
        y = (y / (h + eps) * self.scale)[:, None].expand(h, w)
        x = (x / (w + eps) * self.scale)[None, :].expand(h, w)
        dim_t = torch.arange(self.hidden_dim, dtype=torch.float32, device=weight.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)

        def fourier(v: torch.Tensor) -> torch.Tensor:
            v = v[:, :, None] / dim_t
            return torch.stack((v[:, :, 0::2].sin(), v[:, :, 1::2].cos()), dim=3).flatten(2)

        pos = torch.cat((fourier(y), fourier(x)), dim=2).permute(2, 0, 1)[None]
        return self.token_projection(pos.to(weight.dtype))


class ConvEncoder(nn.Module):
    """Depthwise kxk conv -> LayerNorm -> Linear -> GELU -> Linear -> layer scale -> residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, expan_ratio: int = 4,
                 kernel_size: int = 7):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.pwconv1 = nn.Linear(dim, expan_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expan_ratio * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.register_parameter("gamma1", None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        if self.gamma1 is not None:
            x = self.gamma1 * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class XCA(nn.Module):
    """Cross-covariance attention: softmax over (head_dim x head_dim) channel affinities of
    L2-normalised q and k (normalised over the tokens), scaled by a learned temperature per head."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (3, B, heads, head_dim, N)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (_l2_normalize(q) @ _l2_normalize(k).transpose(-2, -1)) * self.temperature
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class SDTAEncoder(nn.Module):
    """Split depthwise-transposed attention block.

    The channels are split into groups of ``ceil(dim / scales)``; each group but
    the last gets a depthwise 3x3 conv after adding the previous group's output
    (Res2Net-style); then [position encoding] + XCA and an inverted bottleneck,
    each with layer scale and a residual.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, expan_ratio: int = 4,
                 use_pos_emb: bool = True, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 drop: float = 0.0, scales: int = 1):
        super().__init__()
        self.width = max(int(math.ceil(dim / scales)), int(math.floor(dim // scales)))
        self.nums = 1 if scales == 1 else scales - 1
        self.convs = nn.ModuleList([
            nn.Conv2d(self.width, self.width, kernel_size=3, padding=1, groups=self.width) for _ in range(self.nums)
        ])
        self.pos_embd = PositionalEncodingFourier(dim=dim) if use_pos_emb else None
        self.norm_xca = nn.LayerNorm(dim, eps=_LN_EPS)
        self.gamma_xca = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.xca = XCA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.pwconv1 = nn.Linear(dim, expan_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expan_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        spx = torch.split(x, self.width, dim=1)
        outs, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            if i > 0:
                sp = sp + spx[i]
            sp = conv(sp)
            outs.append(sp)
        x = torch.cat(outs + [spx[self.nums]], dim=1)

        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).transpose(1, 2)
        if self.pos_embd is not None:
            x = x + self.pos_embd(h, w).reshape(1, c, h * w).transpose(1, 2)
        x = x + self.drop_path(self.gamma_xca * self.xca(self.norm_xca(x)))

        x = self.pwconv2(self.act(self.pwconv1(self.norm(x.reshape(b, h, w, c)))))
        x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class EdgeNeXt(nn.Module):
    """EdgeNeXt classifier; ``feature_info``: ``stages.0`` .. ``stages.3``.

    Args:
        in_channels, num_classes: input channels, classifier outputs.
        depths: blocks per stage.
        dims: channels per stage.
        global_block: how many of each stage's last blocks are SDTA blocks.
        drop_path_rate: stochastic depth rate, rising linearly over all blocks.
        layer_scale_init_value: initial layer scale of the conv blocks (SDTA blocks start at 1e-6, as MindCV).
        head_init_scale: factor applied to the initial classifier weights.
        expan_ratio: inverted-bottleneck expansion.
        kernel_sizes: depthwise kernel of each stage's conv blocks.
        heads: XCA heads per stage.
        use_pos_embd_xca: whether each stage's SDTA blocks add the Fourier position encoding.
        d2_scales: channel groups of each stage's SDTA blocks.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (24, 48, 88, 168), global_block: Sequence[int] = (0, 0, 0, 3),
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 expan_ratio: int = 4, kernel_sizes: Sequence[int] = (7, 7, 7, 7), heads: Sequence[int] = (8, 8, 8, 8),
                 use_pos_embd_xca: Sequence[bool] = (False, False, False, False),
                 d2_scales: Sequence[int] = (2, 3, 4, 5), drop_rate: float = 0.0):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"EdgeNeXt: depths {list(depths)} and dims {list(dims)} differ in length")
        total = sum(depths)
        # np.linspace(0, rate, total) as MindCV, without numpy so it also runs under torch.device("meta").
        dp_rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.downsample_layers = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.feature_info: List[dict] = []
        reduction, cur = 1, 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i == 0:
                stride = _STEM_STRIDE
                down = nn.Sequential(Conv2d(in_channels, dim, kernel_size=stride, stride=stride, has_bias=True),
                                     LayerNorm2d(dim, eps=_LN_EPS))
            else:
                stride = _DOWNSAMPLE_STRIDE
                down = nn.Sequential(LayerNorm2d(dims[i - 1], eps=_LN_EPS),
                                     Conv2d(dims[i - 1], dim, kernel_size=stride, stride=stride, has_bias=True))
            reduction *= stride
            blocks: List[nn.Module] = []
            for j in range(depth):
                if j >= depth - global_block[i]:
                    blocks.append(SDTAEncoder(dim, drop_path=dp_rates[cur + j], expan_ratio=expan_ratio,
                                              scales=d2_scales[i], use_pos_emb=use_pos_embd_xca[i],
                                              num_heads=heads[i]))
                else:
                    blocks.append(ConvEncoder(dim, drop_path=dp_rates[cur + j],
                                              layer_scale_init_value=layer_scale_init_value,
                                              expan_ratio=expan_ratio, kernel_size=kernel_sizes[i]))
            cur += depth
            self.downsample_layers.append(down)
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"stages.{i}"))
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=_LN_EPS)
        self.head = nn.Linear(dims[-1], num_classes)
        self.head_dropout = nn.Dropout(drop_rate)
        tn = trunc_normal(0.02, -2.0, 2.0)
        init_weights(self, conv=tn, linear=tn)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        for i in range(deepest + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                out.append(x.contiguous())
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the final norm, the head and every stage after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.norm, self.head, self.head_dropout
        del self.downsample_layers[deepest + 1:]
        del self.stages[deepest + 1:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-32 map (MindCV's ``forward_features`` also pools and normalises: see ``forward_head``)."""
        return self.forward_levels(x, [len(self.feature_info) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.norm(x.mean(dim=(-2, -1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_edgenext(variant: str, pretrained: bool = False, **kwargs) -> EdgeNeXt:
    return build_model_with_cfg(EdgeNeXt, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


@dataclass(frozen=True)
class EdgeNeXtCfg:
    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    heads: Tuple[int, ...] = (8, 8, 8, 8)
    global_block: Tuple[int, ...] = (0, 1, 1, 1)
    use_pos_embd_xca: Tuple[bool, ...] = (False, True, False, False)
    kernel_sizes: Tuple[int, ...] = (3, 5, 7, 9)
    d2_scales: Tuple[int, ...] = (2, 2, 3, 4)


model_cfgs = dict(
    edgenext_xx_small=EdgeNeXtCfg(depths=(2, 2, 6, 2), dims=(24, 48, 88, 168), heads=(4, 4, 4, 4)),
    edgenext_x_small=EdgeNeXtCfg(depths=(3, 3, 9, 3), dims=(32, 64, 100, 192), heads=(4, 4, 4, 4)),
    edgenext_small=EdgeNeXtCfg(depths=(3, 3, 9, 3), dims=(48, 96, 160, 304)),
    edgenext_base=EdgeNeXtCfg(depths=(3, 3, 9, 3), dims=(80, 160, 288, 584)),
)


def _cfg(url: str = "", **kwargs):
    # MindCV's cfg names "conv_0.conv" and "last_linear", which EdgeNeXt does not have; these are the real ones.
    return dict(url=url, num_classes=1000, input_size=(3, 256, 256), first_conv="downsample_layers.0.0",
                classifier="head", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/edgenext"

# MindSpore's saved names (see the module docstring) -> module paths, applied in order. The stem is saved as
# 0.0.* (conv) and 0.1.* (norm), downsampling layer i > 0 as 0.i.0.* (norm) and 0.i.1.* (conv), block j of
# stage 0 as 0.j.*, block j of stage i > 0 as 0.i.j.*. The first four rules name every parameter of the stem
# and downsampling layers (a block has no parameter of its own called weight/bias, and no MindCV variant has an
# SDTA block, whose layer scale is called gamma, in stage 0 or first in a stage); names already in the
# module-path form start with a letter and are left alone.
_MINDCV_RENAMES = (
    (r"^0\.0\.(weight|bias)$", r"downsample_layers.0.0.\1"),
    (r"^0\.1\.(gamma|beta)$", r"downsample_layers.0.1.\1"),
    (r"^0\.([1-3])\.0\.(gamma|beta)$", r"downsample_layers.\1.0.\2"),
    (r"^0\.([1-3])\.1\.(weight|bias)$", r"downsample_layers.\1.1.\2"),
    (r"^0\.([1-3])\.(\d+)\.", r"stages.\1.\2."),
    (r"^0\.(\d+)\.", r"stages.0.\1."),
)

# timm's edgenext_* have our parameters: its stem and stages.<i>.downsample are downsample_layers.<i>, its
# stages.<i>.blocks.<j> our stages.<i>.<j>; its conv blocks call the layer scale gamma (gamma1 here), its SDTA
# blocks gamma as here, so the conversion tells them apart by the block's depthwise conv.
_TIMM_RENAMES = (
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc1\.", ".pwconv1."),
    (r"\.mlp\.fc2\.", ".pwconv2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
)


def _from_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    rules = [(re.compile(p), r) for p, r in _TIMM_RENAMES]
    out = {}
    for name, tensor in state_dict.items():
        new = name
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if name.endswith(".gamma") and name[: -len("gamma")] + "conv_dw.weight" in state_dict:
            new += "1"
        out[new] = tensor
    return out


default_cfgs = generate_default_cfgs({
    "edgenext_xx_small": _cfg(f"{_MS}/edgenext_xx_small-afc971fb.ckpt"),
    "edgenext_x_small": _cfg(f"{_MS}/edgenext_x_small-a200c6fc.ckpt"),
    "edgenext_small": _cfg(f"{_MS}/edgenext_small-f530c372.ckpt"),
    "edgenext_base": _cfg(f"{_MS}/edgenext_base-4335e9dc.ckpt"),
}, timm_twins={n: n for n in model_cfgs}, timm_convert=_from_timm, mindcv_renames=_MINDCV_RENAMES)


@register_model
def edgenext_xx_small(pretrained: bool = False, **kwargs) -> EdgeNeXt:
    return _create_edgenext("edgenext_xx_small", pretrained, **kwargs)


@register_model
def edgenext_x_small(pretrained: bool = False, **kwargs) -> EdgeNeXt:
    return _create_edgenext("edgenext_x_small", pretrained, **kwargs)


@register_model
def edgenext_small(pretrained: bool = False, **kwargs) -> EdgeNeXt:
    return _create_edgenext("edgenext_small", pretrained, **kwargs)


@register_model
def edgenext_base(pretrained: bool = False, **kwargs) -> EdgeNeXt:
    return _create_edgenext("edgenext_base", pretrained, **kwargs)
