"""MLP-Mixer, with MindCV's module tree and parameter names.

`MLP-Mixer: An all-MLP Architecture for Vision <https://arxiv.org/abs/2105.01601>`_.
An unpadded, bias-free patch conv (k = s = patch) turns the image into
tokens, ``depth`` mixer blocks mix them (a token-mixing MLP across the token
axis, then a channel-mixing MLP, each pre-norm and residual), a final
LayerNorm, the mean over tokens and a linear head. No class token, no
position embedding.

MindCV details kept here: the patch conv has no bias (MindSpore's
``nn.Conv2d`` default), every LayerNorm has eps 1e-7 (MindSpore's default;
timm 1e-6), GELU is MindSpore's default tanh approximation (timm: exact).
MindCV's init is MindSpore's defaults, which are PyTorch's (He-uniform with
``a = sqrt(5)``, uniform biases), so nothing is re-initialised. timm's
``mixer_*`` models have the same shapes otherwise, but a stem bias and other
names, so none is declared a weight twin (``tests/test_mlpmixer.py`` compares
against timm with the weights converted and the differences swapped).

Input size: the token-mixing MLPs are ``Linear(num_tokens, token_dim)``
layers, so their weights fix the number of tokens, and with it the input:
224 x 224 px only (the cfg's ``input_sides``), for the feature model and the
classifier alike. Any other input raises a ``ValueError`` before anything is
computed. (A token MLP applied to another grid would mix tokens it was not
trained for; there is nothing to resample, unlike a position embedding.)

``feature_info``: one entry per mixer block, ``mixer_blocks.0`` ..
``mixer_blocks.{depth-1}``, its tokens as a NCHW map at the patch stride
(no final norm), marked ``native=True``; plus the parameter-free pyramid
levels derived from the last block (``native=False``; see
:mod:`featurezoo.layers.plain_pyramid`): patch 16 gives strides 4/8/16/32,
patch 32 gives 4/8/16/32 with the last block at 32, patch 14
(``mlp_mixer_h_p14``) derives nothing, since 14-px tokens lie on no
power-of-two multiple of a stride-4/8/16/32 grid, so its ``"pyramid"`` is the
last block alone at stride 14.

Checkpoint names: MindCV fills an empty ``SequentialCell`` with ``append``,
and MindSpore names the parameters of block ``0`` ``0.<path>`` and those of
block ``i >= 1`` ``0.token_mix.<i>.<path>`` (e.g.
``mixer_blocks.3.channel_mix.1.net.0.weight`` is saved as
``0.token_mix.3.channel_mix.1.net.0.weight``); the cfg's ``mindcv_renames``
map both onto the module paths, and module-path names load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.fx_calls import fx_call
from ..layers.plain_pyramid import level_blocks, plain_feature_info, plain_levels
from ..layers.tokens import tokens_to_nchw
from ..registry import register_model

__all__ = ["MLPMixer", "MixerBlock", "FeedForward", "TransPose"]

_LN_EPS = 1e-7  # MindSpore's nn.LayerNorm default


@fx_call
def check_only_size(x: torch.Tensor, side: int, grid: Tuple[int, int], patch: int) -> torch.Tensor:
    """``x``, or a ``ValueError`` when it is not ``side`` x ``side`` px (the only size an MLP-Mixer serves)."""
    h, w = x.shape[-2:]
    if (h, w) != (side, side):
        raise ValueError(
            f"MLPMixer: input {h}x{w} px; this model runs only at {side}x{side} px: its token-mixing MLPs are "
            f"built for the {grid[0]}x{grid[1]} = {grid[0] * grid[1]} tokens of "
            f"{patch}-px patches at {side} px (resize the input to {side}x{side})")
    return x


class TransPose(nn.Module):
    """Swap the token and channel axes of ``(B, N, C)`` tokens; with ``embedding``, first flatten a NCHW
    map to ``(B, C, H*W)`` (so the result is ``(B, H*W, C)`` tokens). MindCV's parameter-free layer."""

    def __init__(self, embedding: bool = False):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            x = x.flatten(2)
        return x.transpose(1, 2)


class FeedForward(nn.Module):
    """Linear -> GELU (tanh) -> Dropout -> Linear -> Dropout, as ``net.0`` .. ``net.4``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Dropout(drop),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MixerBlock(nn.Module):
    """``x + token_mix(x)`` (LayerNorm, MLP over the token axis), then ``x + channel_mix(x)``."""

    def __init__(self, num_tokens: int, dim: int, token_dim: int, channel_dim: int, drop: float = 0.0):
        super().__init__()
        self.token_mix = nn.Sequential(
            nn.LayerNorm(dim, eps=_LN_EPS),
            TransPose(),
            FeedForward(num_tokens, token_dim, drop),
            TransPose(),
        )
        self.channel_mix = nn.Sequential(
            nn.LayerNorm(dim, eps=_LN_EPS),
            FeedForward(dim, channel_dim, drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(x)
        return x + self.channel_mix(x)


class MLPMixer(nn.Module):
    """MLP-Mixer classifier; ``feature_info``: every mixer block at the patch stride plus the derived pyramid.

    Args:
        depth: number of mixer blocks.
        patch_size: the patch conv's kernel and stride.
        image_size: the only input side (the token MLPs are built for ``(image_size // patch_size) ** 2``
            tokens).
        dim: channels of a token (MindCV's ``n_channels``).
        token_dim, channel_dim: hidden widths of the token- and channel-mixing MLPs.
        in_channels, num_classes: input channels, classifier outputs (0: no head).
        drop_rate: dropout inside the MLPs (MindCV: 0).
    """

    def __init__(self, depth: int, patch_size: int, image_size: int = 224, dim: int = 512, token_dim: int = 256,
                 channel_dim: int = 2048, in_channels: int = 3, num_classes: int = 1000, drop_rate: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"MLPMixer: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        num_tokens = self.grid[0] * self.grid[1]
        self.to_patch_embedding = nn.Sequential(
            nn.Conv2d(in_channels, dim, patch_size, patch_size, padding=0, bias=False),
            TransPose(embedding=True),
        )
        self.mixer_blocks = nn.Sequential(*[
            MixerBlock(num_tokens, dim, token_dim, channel_dim, drop_rate) for _ in range(depth)
        ])
        self.feature_info = plain_feature_info(dim, patch_size, [f"mixer_blocks.{i}" for i in range(depth)])
        self._level_blocks = level_blocks(self.feature_info)
        self.num_features = dim
        self.layer_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def _run(self, x: torch.Tensor, keep: Sequence[int] = (), last: Optional[int] = None
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """Blocks 0..``last`` (default: all): the NCHW maps of the blocks in ``keep``, and the last tokens."""
        x = check_only_size(x, self.image_size, self.grid, self.patch_size)
        x = self.to_patch_embedding(x)
        maps: Dict[int, torch.Tensor] = {}
        stop = len(self.mixer_blocks) if last is None else last + 1
        for i in range(stop):
            x = self.mixer_blocks[i](x)
            if i in keep:
                maps[i] = tokens_to_nchw(x, self.grid)
        return maps, x

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing no block past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        keep = {self._level_blocks[i] for i in take}
        maps, _ = self._run(x, keep, max(keep))
        return plain_levels(self.feature_info, sorted(take), maps)

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the final norm, the head and every block after the deepest one the entries ``indices`` need."""
        take, _ = take_levels(indices, len(self.feature_info))
        last = max(self._level_blocks[i] for i in take)
        del self.mixer_blocks[last + 1:]
        del self.layer_norm, self.mlp_head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens after the blocks and the final norm, (B, H*W, C)."""
        return self.layer_norm(self._run(x)[1])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mlpmixer(variant: str, pretrained: bool = False, **kwargs) -> MLPMixer:
    return build_model_with_cfg(MLPMixer, pretrained, default_cfg=default_cfgs[variant],
                                **vars(model_cfgs[variant]), **kwargs)


@dataclass(frozen=True)
class MixerCfg:
    """A variant's shape (see :class:`MLPMixer`); MindCV's nl, pr, hs, ds, dc."""

    depth: int
    patch_size: int
    dim: int
    token_dim: int
    channel_dim: int


model_cfgs = dict(
    mlp_mixer_s_p32=MixerCfg(8, 32, 512, 256, 2048),
    mlp_mixer_s_p16=MixerCfg(8, 16, 512, 256, 2048),
    mlp_mixer_b_p32=MixerCfg(12, 32, 768, 384, 3072),
    mlp_mixer_b_p16=MixerCfg(12, 16, 768, 384, 3072),
    mlp_mixer_l_p32=MixerCfg(24, 32, 1024, 512, 4096),
    mlp_mixer_l_p16=MixerCfg(24, 16, 1024, 512, 4096),
    mlp_mixer_h_p14=MixerCfg(32, 14, 1280, 640, 5120),
)


def _cfg(variant: str) -> dict:
    p = model_cfgs[variant].patch_size
    g = 224 // p
    # MindCV's default_cfgs give no url and no preprocessing: ImageNet's defaults at 224 px.
    return dict(url="", num_classes=1000, first_conv="to_patch_embedding.0", classifier="mlp_head",
                input_size=(3, 224, 224), fixed_input_size=True, input_sides=(224,),
                size_note=f"the token-mixing MLPs are Linear layers over the {g}x{g} = {g * g} tokens of "
                          f"{p}-px patches at 224 px: their weights fix the token count, so the model (classifier "
                          f"and features) runs only at 224x224 px and raises a ValueError at any other size")


# MindSpore's names for the blocks of MindCV's appended SequentialCell: block 0 is "0.<path>", block
# i >= 1 is "0.token_mix.<i>.<path>" (checked pairwise against parameters_and_names() for every variant).
_MINDCV_RENAMES = (
    (r"^0\.token_mix\.(\d+)\.(token_mix|channel_mix)\.", r"mixer_blocks.\1.\2."),
    (r"^0\.(token_mix|channel_mix)\.", r"mixer_blocks.0.\1."),
)

default_cfgs = generate_default_cfgs({name: _cfg(name) for name in model_cfgs}, mindcv_renames=_MINDCV_RENAMES)


@register_model
def mlp_mixer_s_p32(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_s_p32", pretrained, **kwargs)


@register_model
def mlp_mixer_s_p16(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_s_p16", pretrained, **kwargs)


@register_model
def mlp_mixer_b_p32(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_b_p32", pretrained, **kwargs)


@register_model
def mlp_mixer_b_p16(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_b_p16", pretrained, **kwargs)


@register_model
def mlp_mixer_l_p32(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_l_p32", pretrained, **kwargs)


@register_model
def mlp_mixer_l_p16(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_l_p16", pretrained, **kwargs)


@register_model
def mlp_mixer_h_p14(pretrained: bool = False, **kwargs) -> MLPMixer:
    return _create_mlpmixer("mlp_mixer_h_p14", pretrained, **kwargs)
