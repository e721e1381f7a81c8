"""PoolFormer, with MindCV's module tree and parameter names.

`MetaFormer Is Actually What You Need for Vision <https://arxiv.org/abs/2111.11418>`_:
a ViT-like block whose token mixer is a 3x3 average pool minus its input,
in a four-stage NCHW pyramid.

MindCV details kept here: the pool pads with MindSpore's ``same`` mode and
leaves the padded cells out of the average (``count_include_pad=False``);
every norm is a one-group GroupNorm (eps 1e-5), including the final ``norm``,
which normalises the whole stride-32 map *before* the global average (timm
pools first and then normalises: the one difference from timm's
``poolformer_*``, whose weights map onto ours one to one); GELU is exact; the
layer scales are plain parameters ``layer_scale_1`` / ``layer_scale_2``.

``network`` alternates stages and downsampling patch embeddings
(``network.1/3/5``); ``feature_info`` names the stages ``network.0/2/4/6`` at
reductions 4, 8, 16, 32. The k7 s4 stem pads 2 on each side, so its map has
``floor((size + 1) / 4)`` rows: one fewer than ``ceil(size / 4)`` where
``size % 4`` is 1 or 2 (MindCV and timm alike); the k3 s2 p1 downsamplings
halve with rounding up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..cfg import IndexMap
from ..features import take_levels
from ..layers import AvgPool2d
from ..layers.drop_path import DropPath
from ..layers.init import init_weights, trunc_normal
from ..registry import register_model

__all__ = ["PoolFormer", "PoolFormerBlock", "Pooling", "ConvMlp", "PatchEmbed"]

_GN_EPS = 1e-5  # MindSpore's nn.GroupNorm default


def _group_norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, dim, eps=_GN_EPS)


class ConvMlp(nn.Module):
    """1x1 conv -> exact GELU -> 1x1 conv, on NCHW maps."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1)
        self.norm = nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, in_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """A strided conv with symmetric explicit padding (the stem and the downsamplings)."""

    def __init__(self, in_chs: int, embed_dim: int, patch_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Pooling(nn.Module):
    """``avg_pool(x) - x``; the average counts only the cells inside the map."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = AvgPool2d(pool_size, stride=1, pad_mode="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class PoolFormerBlock(nn.Module):
    """``x + ls1 * pool_mix(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``."""

    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5):
        super().__init__()
        self.norm1 = _group_norm(dim)
        self.token_mixer = Pooling(pool_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _group_norm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        if layer_scale_init_value:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.register_parameter("layer_scale_1", None)
            self.register_parameter("layer_scale_2", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.token_mixer(self.norm1(x))
        if self.layer_scale_1 is not None:
            mixed = self.layer_scale_1[:, None, None] * mixed
        x = x + self.drop_path(mixed)
        mlp = self.mlp(self.norm2(x))
        if self.layer_scale_2 is not None:
            mlp = self.layer_scale_2[:, None, None] * mlp
        return x + self.drop_path(mlp)


class PoolFormer(nn.Module):
    """PoolFormer classifier; ``feature_info``: ``network.0/2/4/6`` (the four stages).

    Args:
        layers: blocks per stage.
        embed_dims: channels per stage.
        mlp_ratios: MLP expansion per stage.
        downsamples: whether a patch embedding follows stage i (one is added anyway
            where the width changes).
        pool_size: the token mixer's pooling window.
        in_channels, num_classes: input channels, classifier outputs.
        in_patch_size, in_stride, in_pad: the stem conv.
        down_patch_size, down_stride, down_pad: the downsampling convs.
        drop_rate, drop_path_rate: MLP dropout, stochastic depth (rising linearly over all blocks).
        layer_scale_init_value: initial layer scale; 0 disables it.
    """

    def __init__(self, layers: Sequence[int], embed_dims: Sequence[int] = (64, 128, 320, 512),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), downsamples: Sequence[bool] = (True, True, True, True),
                 pool_size: int = 3, in_channels: int = 3, num_classes: int = 1000, in_patch_size: int = 7,
                 in_stride: int = 4, in_pad: int = 2, down_patch_size: int = 3, down_stride: int = 2,
                 down_pad: int = 1, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-5):
        super().__init__()
        if not len(layers) == len(embed_dims) == len(mlp_ratios):
            raise ValueError(f"PoolFormer: layers {list(layers)}, embed_dims {list(embed_dims)} and mlp_ratios "
                             f"{list(mlp_ratios)} differ in length")
        self.patch_embed = PatchEmbed(in_channels, embed_dims[0], in_patch_size, in_stride, in_pad)
        reduction = in_stride
        total = sum(layers)
        network: List[nn.Module] = []
        self.feature_info: List[dict] = []
        for i, (depth, dim) in enumerate(zip(layers, embed_dims)):
            first = sum(layers[:i])
            network.append(nn.Sequential(*[
                PoolFormerBlock(dim, pool_size, mlp_ratios[i], drop=drop_rate,
                                drop_path=drop_path_rate * (first + j) / (total - 1) if total > 1 else 0.0,
                                layer_scale_init_value=layer_scale_init_value)
                for j in range(depth)
            ]))
            self.feature_info.append(dict(chs=dim, reduction=reduction, name=f"network.{len(network) - 1}"))
            if i < len(layers) - 1 and (downsamples[i] or dim != embed_dims[i + 1]):
                network.append(PatchEmbed(dim, embed_dims[i + 1], down_patch_size, down_stride, down_pad))
                reduction *= down_stride
        self.network = nn.Sequential(*network)
        # network index of each level's stage, for forward_levels / prune_levels.
        self._level_layers: Tuple[int, ...] = tuple(int(e["name"].rsplit(".", 1)[1]) for e in self.feature_info)
        self.num_features = embed_dims[-1]
        self.norm = _group_norm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        tn = trunc_normal(0.02, -2.0, 2.0)
        mlp_convs = [m for blk in self.modules() if isinstance(blk, ConvMlp) for m in (blk.fc1, blk.fc2)]
        init_weights(self, linear=tn, special={m: tn for m in mlp_convs})

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        wanted = {self._level_layers[i] for i in take}
        out = []
        x = self.patch_embed(x)
        for j, layer in enumerate(self.network[: self._level_layers[deepest] + 1]):
            x = layer(x)
            if j in wanted:
                out.append(x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the final norm, the head and every layer after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        del self.norm, self.head
        del self.network[self._level_layers[deepest] + 1:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised stride-32 map (MindCV normalises before pooling)."""
        return self.norm(self.forward_levels(x, [len(self.feature_info) - 1])[0])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_poolformer(variant: str, pretrained: bool = False, **kwargs) -> PoolFormer:
    return build_model_with_cfg(PoolFormer, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


@dataclass(frozen=True)
class PoolFormerCfg:
    layers: Tuple[int, ...]
    embed_dims: Tuple[int, ...] = (64, 128, 320, 512)
    layer_scale_init_value: float = 1e-5


model_cfgs = dict(
    poolformer_s12=PoolFormerCfg(layers=(2, 2, 6, 2)),
    poolformer_s24=PoolFormerCfg(layers=(4, 4, 12, 4)),
    poolformer_s36=PoolFormerCfg(layers=(6, 6, 18, 6), layer_scale_init_value=1e-6),
    poolformer_m36=PoolFormerCfg(layers=(6, 6, 18, 6), embed_dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
    poolformer_m48=PoolFormerCfg(layers=(8, 8, 24, 8), embed_dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
)


_VALID = ("the k7 stride-4 stem pads 2 per side: floor((size + 1) / 4) rows, one fewer than ceil(size / 4) "
          "where size % 4 is 1 or 2 (MindCV and timm alike)")


def _cfg(url: str = "", **kwargs):
    # MindCV's cfg names neither layer; these are the real ones.
    return dict(url=url, num_classes=1000, first_conv="patch_embed.proj", classifier="head", valid_padding=_VALID,
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/poolformer"

# Same parameters as timm's poolformer_* (metaformer.py), which pools before its final norm (see the module
# docstring). timm's stage i is its downsampling conv (none in stage 0) followed by its blocks.
_TIMM_TWINS = {n: n for n in model_cfgs}
_TIMM_RENAMES = (
    (r"^stem\.conv\.", "patch_embed.proj."),
    (r"^stages\.(\d+)\.downsample\.conv\.", IndexMap("network.{0}.proj.", (2, -1))),
    (r"^stages\.(\d+)\.blocks\.", IndexMap("network.{0}.", (2, 0))),
    (r"\.layer_scale(\d)\.scale$", r".layer_scale_\1"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
)

default_cfgs = generate_default_cfgs({
    "poolformer_s12": _cfg(f"{_MS}/poolformer_s12-5be5c4e4.ckpt", crop_pct=0.9),
    "poolformer_s24": _cfg(crop_pct=0.9),
    "poolformer_s36": _cfg(crop_pct=0.9),
    "poolformer_m36": _cfg(crop_pct=0.95),
    "poolformer_m48": _cfg(crop_pct=0.95),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def poolformer_s12(pretrained: bool = False, **kwargs) -> PoolFormer:
    return _create_poolformer("poolformer_s12", pretrained, **kwargs)


@register_model
def poolformer_s24(pretrained: bool = False, **kwargs) -> PoolFormer:
    return _create_poolformer("poolformer_s24", pretrained, **kwargs)


@register_model
def poolformer_s36(pretrained: bool = False, **kwargs) -> PoolFormer:
    return _create_poolformer("poolformer_s36", pretrained, **kwargs)


@register_model
def poolformer_m36(pretrained: bool = False, **kwargs) -> PoolFormer:
    return _create_poolformer("poolformer_m36", pretrained, **kwargs)


@register_model
def poolformer_m48(pretrained: bool = False, **kwargs) -> PoolFormer:
    return _create_poolformer("poolformer_m48", pretrained, **kwargs)
