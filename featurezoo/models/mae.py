"""MAE (Masked Autoencoders), with MindCV's module trees and parameter names.

`Masked Autoencoders Are Scalable Vision Learners <https://arxiv.org/abs/2111.06377>`_.

* ``mae_{b_16,l_16,h_14}_224_finetune``: MindCV's fine-tuning models, a
  :class:`~featurezoo.models.vit.VisionTransformer` with average pooling of the
  patch tokens and ``fc_norm`` (no final norm), LayerNorm eps 1e-6 and GELU
  still MindSpore's tanh approximation. timm's ``vit_base_patch16_224`` /
  ``vit_large_patch16_224`` / ``vit_huge_patch14_224`` built with
  ``global_pool="avg", fc_norm=True`` hold the same parameters under the same
  names (timm's GELU is exact); those creation arguments are not expressible
  as a declared twin, so ``tests/test_mae.py`` checks that pairing.
* ``mae_{b,l,h}_16_224_pretrain``: :class:`MAEForPretrain`, the encoder
  (exact GELU, LayerNorm eps 1e-6, a fixed 2-D sin-cos position embedding
  stored as a frozen parameter) and MindCV's decoder (512 wide, 8 blocks).
  MindCV registers these names but cannot create them (its ``default_cfgs``
  has no entry for them, and its forward needs a mask input), so they have no
  MindCV parity; their parameter names and counts are MindCV's class's.
  ``forward(x, mask)`` is MindCV's pre-training step (the masked patches'
  normalised-pixel loss); features come from the encoder, unmasked.

``feature_info`` for all six: one entry per encoder block at the patch stride
(class token dropped, no final norm) plus the parameter-free pyramid levels
derived from the last block (:mod:`featurezoo.layers.plain_pyramid`); patch 14
(``mae_h_14_224_finetune``) has no power-of-two route to strides 4/8/16/32, so
it lists the blocks only and its ``"pyramid"`` is the last block.

Input sizes: as ViT, position embeddings (also the decoder's) are resampled
bicubically to other grids, non-square included, and untouched at 224 px.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers.init import init_weights, xavier_uniform
from ..layers.plain_pyramid import level_blocks, plain_feature_info, plain_levels
from ..layers.tokens import nchw_to_tokens, resample_pos_embed, tokens_to_nchw
from ..registry import register_model
from .vit import Block, PatchEmbed, VisionTransformer, vit_size_facts

__all__ = ["MAEForPretrain", "sincos_pos_embed_2d"]

_LN_EPS = 1e-6


def sincos_pos_embed_2d(embed_dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed position embedding of a ``grid`` x ``grid`` token grid, (prefix + grid**2, embed_dim)
    float32: the first half of the channels encodes the column, the second the row, each as
    ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (embed_dim / 4))``; a zero row for the
    class token first. Computed in float64 and rounded once (MindCV computes it in float32 numpy)."""
    if embed_dim % 4:
        raise ValueError(f"MAE: sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.float()


class MAEForPretrain(nn.Module):
    """MAE encoder + decoder (MindCV's ``MAEForPretrain``); ``feature_info``: the encoder's blocks.

    Args:
        image_size, patch_size, in_channels: the input the fixed position embeddings are built for.
        embed_dim, depth, num_heads, mlp_ratio: the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder.
        norm_pix_loss: normalise each target patch by its mean and (population) std.
        mask_ratio: the fraction of patches a mask hides (the encoder keeps
            ``floor(N * (1 - mask_ratio))`` of the ``N`` patches).
        num_classes: accepted and ignored (MindCV's builders take it too).
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_channels: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, qkv_bias: bool = True,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_values: Optional[float] = None, norm_pix_loss: bool = True, mask_ratio: float = 0.75,
                 num_classes: int = 1000):
        super().__init__()
        del num_classes
        grid = image_size // patch_size
        self.pos_grid = (grid, grid)
        self.num_patches = grid * grid
        self.in_channels = in_channels
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.num_prefix_tokens = 1
        block = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                     init_values=init_values, norm_eps=_LN_EPS, gelu_approximate="none")
        # MindCV gives the decoder blocks the encoder's first drop-path rates.
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, drop_path=dpr[i], **block) for i in range(depth)])
        self.feature_info = plain_feature_info(embed_dim, patch_size, [f"blocks.{i}" for i in range(depth)])
        self._level_blocks = level_blocks(self.feature_info)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid)[None], requires_grad=False)
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_embed_dim, grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, drop_path=dpr[i], **block)
                                             for i in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=_LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_channels)
        self._initialize_weights()

    @torch.no_grad()
    def _initialize_weights(self) -> None:
        # MindCV: Dense and the patch conv xavier_uniform, biases zero; cls and mask tokens N(0, 0.02).
        init_weights(self, conv=xavier_uniform, linear=xavier_uniform)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- encoder ---------------------------------------------------------------------------------------
    def _apply_masking(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The patches ``mask`` leaves visible (0 before 1, ties in patch order) and the order that restores them."""
        ids_shuffle = torch.argsort(mask.float(), dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
        keep = int(math.floor(x.shape[1] * (1 - self.mask_ratio)))
        ids_keep = ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[2])
        return torch.gather(x, 1, ids_keep), ids_restore

    def _run(self, x: torch.Tensor, keep: Sequence[int] = (), last: Optional[int] = None,
             mask: Optional[torch.Tensor] = None
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """Encoder blocks 0..``last`` (default: all): the NCHW maps of the blocks in ``keep`` (unmasked input
        only), the last tokens, and the restoring order if ``mask`` hid patches."""
        x = self.patch_embed(x)
        hw = (x.shape[-2], x.shape[-1])
        pos = resample_pos_embed(self.pos_embed, hw, self.pos_grid, num_prefix_tokens=1)
        x = nchw_to_tokens(x) + pos[:, 1:]
        ids_restore = None
        if mask is not None:
            x, ids_restore = self._apply_masking(x, mask.reshape(x.shape[0], -1))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        maps: Dict[int, torch.Tensor] = {}
        stop = len(self.blocks) if last is None else last + 1
        for i in range(stop):
            x = self.blocks[i](x)
            if i in keep:
                maps[i] = tokens_to_nchw(x[:, 1:], hw)
        return maps, x, ids_restore

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending) from the unmasked encoder, computing no block
        past the deepest needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        keep = {self._level_blocks[i] for i in take}
        maps = self._run(x, keep, max(keep))[0]
        return plain_levels(self.feature_info, sorted(take), maps)

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the decoder, the encoder's final norm and every block after the deepest one needed."""
        take, _ = take_levels(indices, len(self.feature_info))
        del self.blocks[max(self._level_blocks[i] for i in take) + 1:]
        del self.norm, self.decoder_embed, self.mask_token, self.decoder_pos_embed, self.decoder_blocks
        del self.decoder_norm, self.decoder_pred

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """MindCV's encoder: the normalised tokens (class token first) of the patches ``mask`` leaves
        visible (all without a mask), and the order that restores the patches (``None`` without a mask)."""
        _, x, ids_restore = self._run(x, mask=mask)
        return self.norm(x), ids_restore

    # -- decoder and loss ------------------------------------------------------------------------------
    def forward_decoder(self, x: torch.Tensor, ids_restore: Optional[torch.Tensor], hw: Tuple[int, int]
                        ) -> torch.Tensor:
        """Per-patch pixel predictions (B, H*W, patch**2 * C) from the encoder's tokens on an ``hw`` grid."""
        x = self.decoder_embed(x)
        b, n, d = x.shape
        if ids_restore is not None:
            hidden = ids_restore.shape[1] + 1 - n
            patches = torch.cat((x[:, 1:], self.mask_token.expand(b, hidden, -1)), dim=1)
            patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, d))
            x = torch.cat((x[:, :1], patches), dim=1)
        x = x + resample_pos_embed(self.decoder_pos_embed, hw, self.pos_grid, num_prefix_tokens=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, h*p, w*p) images as (B, h*w, p*p*C) patches, pixels ordered (row, column, channel)."""
        b, c, h, w = imgs.shape
        p = self.patch_embed.patch_size
        x = imgs[:, :, :h - h % p, :w - w % p].reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The inverse of :meth:`patchify` for an ``hw`` patch grid."""
        b = x.shape[0]
        p, c = self.patch_embed.patch_size, self.in_channels
        x = x.reshape(b, hw[0], hw[1], p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, hw[0] * p, hw[1] * p)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches (MindCV's: no eps in the pixel normalisation)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / target.std(dim=-1, keepdim=True, correction=0)
        loss = (pred - target).pow(2).mean(dim=-1)
        mask = mask.reshape(loss.shape).to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With ``mask`` ((B, H*W) or (B, H, W), 1 = hidden): MindCV's pre-training loss (a scalar).
        Without: no patch is hidden, and the output is the decoder's prediction of every patch,
        (B, H*W, patch**2 * C) (MindCV requires a mask)."""
        p = self.patch_embed.patch_size
        hw = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        latent, ids_restore = self.forward_features(imgs, mask)
        pred = self.forward_decoder(latent, ids_restore, hw)
        return pred if mask is None else self.forward_loss(imgs, pred, mask)


def _create_mae(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    c = model_cfgs[variant]
    if c.pretrain:
        return build_model_with_cfg(MAEForPretrain, pretrained, default_cfg=default_cfgs[variant],
                                    image_size=c.image_size, patch_size=c.patch_size, embed_dim=c.embed_dim,
                                    depth=c.depth, num_heads=c.num_heads, **kwargs)
    return build_model_with_cfg(VisionTransformer, pretrained, default_cfg=default_cfgs[variant],
                                image_size=c.image_size, patch_size=c.patch_size, embed_dim=c.embed_dim,
                                depth=c.depth, num_heads=c.num_heads, global_pool="avg", norm_eps=_LN_EPS,
                                **kwargs)


@dataclass(frozen=True)
class MAECfg:
    """A variant's shape; ``pretrain``: encoder + decoder (:class:`MAEForPretrain`), else the fine-tuning ViT."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    pretrain: bool
    image_size: int = 224


model_cfgs = dict(
    mae_b_16_224_finetune=MAECfg(16, 768, 12, 12, pretrain=False),
    mae_l_16_224_finetune=MAECfg(16, 1024, 24, 16, pretrain=False),
    mae_h_14_224_finetune=MAECfg(14, 1280, 32, 16, pretrain=False),
    mae_b_16_224_pretrain=MAECfg(16, 768, 12, 12, pretrain=True),
    mae_l_16_224_pretrain=MAECfg(16, 1024, 24, 16, pretrain=True),
    mae_h_16_224_pretrain=MAECfg(16, 1280, 32, 16, pretrain=True),
)


def _cfg(variant: str, url: str = ""):
    c = model_cfgs[variant]
    # The pre-training model's "classifier" is its decoder: what a feature model drops.
    head = "decoder_embed,decoder_blocks,decoder_norm,decoder_pred" if c.pretrain else "head"
    return dict(url=url, num_classes=1000, first_conv="patch_embed.proj", classifier=head,
                **vit_size_facts(c.image_size, c.patch_size))


_MS = "https://download.mindspore.cn/toolkits/mindcv/mae"

default_cfgs = generate_default_cfgs({
    "mae_b_16_224_finetune": _cfg("mae_b_16_224_finetune", f"{_MS}/mae_b_16_224_finetune-cc05b899.ckpt"),
    "mae_l_16_224_finetune": _cfg("mae_l_16_224_finetune"),
    "mae_h_14_224_finetune": _cfg("mae_h_14_224_finetune"),
    "mae_b_16_224_pretrain": _cfg("mae_b_16_224_pretrain"),
    "mae_l_16_224_pretrain": _cfg("mae_l_16_224_pretrain"),
    "mae_h_16_224_pretrain": _cfg("mae_h_16_224_pretrain"),
})


@register_model
def mae_b_16_224_finetune(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_mae("mae_b_16_224_finetune", pretrained, **kwargs)


@register_model
def mae_l_16_224_finetune(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_mae("mae_l_16_224_finetune", pretrained, **kwargs)


@register_model
def mae_h_14_224_finetune(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_mae("mae_h_14_224_finetune", pretrained, **kwargs)


@register_model
def mae_b_16_224_pretrain(pretrained: bool = False, **kwargs) -> MAEForPretrain:
    return _create_mae("mae_b_16_224_pretrain", pretrained, **kwargs)


@register_model
def mae_l_16_224_pretrain(pretrained: bool = False, **kwargs) -> MAEForPretrain:
    return _create_mae("mae_l_16_224_pretrain", pretrained, **kwargs)


@register_model
def mae_h_16_224_pretrain(pretrained: bool = False, **kwargs) -> MAEForPretrain:
    return _create_mae("mae_h_16_224_pretrain", pretrained, **kwargs)
