"""Learnable necks that turn a backbone's feature maps into a detector's pyramid.

:class:`SimpleFeaturePyramid` is ViTDet's neck (`Li et al. 2022, "Exploring
Plain Vision Transformer Backbones for Object Detection"
<https://arxiv.org/abs/2203.16527>`_; detectron2's
``modeling/backbone/vit.py``): a plain model's last block alone, at stride
16, becomes strides 4/8/16/32 (and optionally 64). For a pyramid without new
weights, plain models already offer ``out_indices="pyramid"``
(:mod:`featurezoo.layers.plain_pyramid`); this neck is for users who train a
detector.

Application-neutral: imports torch and :mod:`featurezoo.layers` only.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SimpleFeaturePyramid", "LayerNorm2d"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a NCHW map (detectron2's ``LayerNorm``, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _resampler(scale: float, dim: int) -> nn.Sequential:
    """ViTDet's path from the input map to one scale, and the channels it outputs."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
    if scale == 2.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2))
    if scale == 1.0:
        return nn.Sequential()
    if scale == 0.5:
        return nn.Sequential(nn.MaxPool2d(2, 2))
    raise ValueError(f"SimpleFeaturePyramid: scale factors must be among 4, 2, 1, 0.5, got {scale!r}")


_OUT_CHS = {4.0: 4, 2.0: 2, 1.0: 1, 0.5: 1}  # the resampler's output channels: dim // this


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one NCHW map (a plain model's last block).

    For an input ``(B, in_channels, H, W)`` at stride ``in_stride`` (16 for a
    ViT-B/16), with the default ``scale_factors=(4, 2, 1, 0.5)``, outputs
    (finest first; ``out`` = ``out_channels``)::

        x4    deconv 2x2 s2 (C -> C/2), LayerNorm, GELU, deconv 2x2 s2 (-> C/4)   (B, out, 4H, 4W)          stride 4
        x2    deconv 2x2 s2 (C -> C/2)                                             (B, out, 2H, 2W)          stride 8
        x1    identity                                                             (B, out, H, W)            stride 16
        x1/2  max pool 2x2 s2 (floor)                                              (B, out, H//2, W//2)      stride 32
        top   max pool k1 s2 of the x1/2 output, if top_block                      (B, out, ceil(H//2 / 2),  stride 64
                                                                                             ceil(W//2 / 2))

    each scale then goes through a 1x1 conv + LayerNorm and a 3x3 conv (pad 1) +
    LayerNorm to ``out_channels`` (convs without bias, as detectron2 with
    ``norm="LN"``). LayerNorms are over channels (eps 1e-6), GELU is exact.

    Attributes:
        out_channels: channels of each output (all ``out_channels``).
        strides: each output's stride (``in_stride / scale``; an int where it is whole).

    Example (the input is the backbone's one output, or a list holding it)::

        # blocks.11, the last block: entry -2 of a ViT-B/16 (-1 is its parameter-free stride-32 level)
        backbone = fz.create_model("vit_b_16_224", features_only=True, out_indices=[-2])
        neck = SimpleFeaturePyramid.from_feature_info(backbone.feature_info[0], out_channels=256, top_block=True)
        maps = neck(backbone(images))     # 5 maps, strides [4, 8, 16, 32, 64], 256 channels each
    """

    def __init__(self, in_channels: int, out_channels: int = 256, in_stride: int = 16,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), top_block: bool = False):
        super().__init__()
        if not scale_factors:
            raise ValueError("SimpleFeaturePyramid: scale_factors is empty")
        self.in_channels = in_channels
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.stages = nn.ModuleList()
        for scale in self.scale_factors:
            dim = in_channels // _OUT_CHS.get(scale, 1)
            self.stages.append(nn.Sequential(
                _resampler(scale, in_channels),
                nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            ))
        self.top_block = top_block
        strides = [in_stride / s for s in self.scale_factors]
        if top_block:
            strides.append(strides[-1] * 2)
        self.strides = [int(s) if float(s).is_integer() else s for s in strides]
        self.out_channels = [out_channels] * len(self.strides)

    @classmethod
    def from_feature_info(cls, entry, **kwargs) -> "SimpleFeaturePyramid":
        """The neck for one ``feature_info`` entry (its ``chs`` and ``reduction``)."""
        return cls(entry["chs"], in_stride=entry["reduction"], **kwargs)

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        """The pyramid (finest first) of one map, or of a backbone's output list holding one map."""
        if not isinstance(x, torch.Tensor):
            if len(x) != 1:
                raise ValueError(f"SimpleFeaturePyramid takes one map (a backbone built with one out_indices "
                                 f"entry), got {len(x)}")
            x = x[0]
        outs = [stage(x) for stage in self.stages]
        if self.top_block:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return outs
