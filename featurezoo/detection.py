"""featurezoo backbones in torchvision's detectors: a feature model plus torchvision's
``FeaturePyramidNetwork``, ready for ``FasterRCNN``, ``RetinaNet``, ``MaskRCNN``, ``FCOS``...

>>> from torchvision.models.detection import FasterRCNN
>>> backbone = fpn_backbone("resnet18", trainable_levels=3)   # doctest: +SKIP
>>> detector = FasterRCNN(backbone, num_classes=91)            # doctest: +SKIP

torchvision's detectors need a module returning an ordered dict of maps and an
``out_channels`` attribute; their default RoI poolers read the maps named
``"0".."3"``. :func:`fpn_backbone` builds exactly that from any featurezoo name:
the feature model returns the selected levels as a dict keyed ``"0", "1", ...``
(``as_dict=True, level_names="{index}"``), the FPN adds ``"pool"`` (or
``"p6", "p7"``). ``trainable_levels`` has torchvision's ``trainable_layers``
meaning (the last ``t`` stages train; one more than the number of stages also
trains the stem), carried out by ``frozen_stages``.

Layer: the model layer (imports the factory and the feature contract); torchvision
is an optional dependency (``pip install 'featurezoo[detection]'``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._optional import require
from .factory import create_model
from .features import FeatureExtractWrapper, get_feature_info
from .freezing import num_stages
from .registry import get_model_cfg

__all__ = ["FPNBackbone", "fpn_backbone", "detection_levels"]

_EXTRA_BLOCKS = ("pool", "p6p7", None)


def detection_levels(model_name: str, min_stride: int = 4, **kwargs: Any) -> list:
    """The ``"pyramid"`` entries of ``model_name`` at stride ``min_stride`` or more (a detector's
    usual C2..C5), as ``feature_info`` indices."""
    info = get_feature_info(model_name, **kwargs)
    pyramid = get_feature_info(model_name, out_indices="pyramid", **kwargs)
    names = [e["name"] for e in info]
    levels = [names.index(e["name"]) for e in pyramid if e["reduction"] >= min_stride]
    if not levels:
        raise ValueError(f"{model_name} has no pyramid level at stride {min_stride} or more: "
                         f"{[(e['name'], e['reduction']) for e in pyramid]}")
    return levels


class FPNBackbone(nn.Module):
    """``body`` (a feature model returning an ordered dict) followed by torchvision's
    ``FeaturePyramidNetwork``; ``out_channels`` is the FPN width, as torchvision's detectors expect."""

    def __init__(self, body: FeatureExtractWrapper, out_channels: int = 256, extra_blocks: Optional[str] = "pool"):
        super().__init__()
        ops = require("torchvision.ops", "detection", "featurezoo.detection", package="torchvision")
        fpn_mod = require("torchvision.ops.feature_pyramid_network", "detection", "featurezoo.detection",
                          package="torchvision")
        if extra_blocks not in _EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks={extra_blocks!r}; valid: {list(_EXTRA_BLOCKS)}")
        if not getattr(body, "as_dict", False):
            raise ValueError("FPNBackbone needs a feature model built with as_dict=True")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        extra = {"pool": fpn_mod.LastLevelMaxPool(), "p6p7": fpn_mod.LastLevelP6P7(out_channels, out_channels),
                 None: None}[extra_blocks]
        self.body = body
        self.fpn = ops.FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.extra_blocks = extra_blocks

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))

    def output_shape(self) -> Dict[str, Any]:
        """{name: ShapeSpec(channels, stride)} of the FPN's outputs."""
        spec = self.body.output_shape()
        shapes = OrderedDict((n, s._replace(channels=self.out_channels)) for n, s in spec.items())
        last = list(spec.values())[-1]
        if self.extra_blocks == "pool":
            shapes["pool"] = last._replace(channels=self.out_channels, stride=last.stride * 2)
        elif self.extra_blocks == "p6p7":
            shapes["p6"] = last._replace(channels=self.out_channels, stride=last.stride * 2)
            shapes["p7"] = last._replace(channels=self.out_channels, stride=last.stride * 4)
        return shapes


def fpn_backbone(model_name: str, out_indices: Union[Sequence[int], str, None] = None,
                 trainable_levels: Optional[int] = 3, out_channels: int = 256, extra_blocks: Optional[str] = "pool",
                 norm_eval: bool = True, pretrained: bool = False, checkpoint_path: str = "",
                 **kwargs: Any) -> FPNBackbone:
    """A torchvision detection backbone (``backbone.out_channels``, dict of maps) from a featurezoo name.

    Args:
        model_name: any featurezoo model with ``features_only``.
        out_indices: the levels fed to the FPN; default: the ``"pyramid"`` levels
            at stride 4 or more (C2..C5 for a ResNet). RetinaNet-style heads use
            the strides 8..32 ones with ``extra_blocks="p6p7"``.
        trainable_levels: torchvision's ``trainable_layers``: the last ``t`` stages
            train, the stem and the others are frozen (``frozen_stages``); ``None``
            or ``stages + 1`` trains everything.
        out_channels: the FPN's width.
        extra_blocks: ``"pool"`` (Faster/Mask R-CNN's P6 by max pool), ``"p6p7"``
            (RetinaNet/FCOS) or ``None``.
        norm_eval: keep BatchNorm statistics frozen in training (torchvision
            freezes them too, with ``FrozenBatchNorm2d``); affine parameters of
            trainable stages still train.
        pretrained, checkpoint_path, **kwargs: passed to :func:`create_model`.
    """
    if out_indices is None:
        out_indices = detection_levels(model_name, **{k: v for k, v in kwargs.items() if k == "output_stride"})
    info = get_feature_info(model_name, **{k: v for k, v in kwargs.items() if k == "output_stride"})
    cfg_stages = num_stages(info.info, get_model_cfg(model_name).stage_modules)
    if trainable_levels is None:
        frozen = -1
    elif isinstance(trainable_levels, bool) or not isinstance(trainable_levels, int) \
            or not 0 <= trainable_levels <= cfg_stages + 1:
        raise ValueError(f"{model_name}: trainable_levels={trainable_levels!r} is not valid; it has {cfg_stages} "
                         f"stages: use 0..{cfg_stages + 1} ({cfg_stages + 1} also trains the stem) or None")
    else:
        frozen = cfg_stages - trainable_levels
    body = create_model(model_name, features_only=True, out_indices=out_indices, as_dict=True,
                        level_names="{index}", frozen_stages=frozen, norm_eval=norm_eval, pretrained=pretrained,
                        checkpoint_path=checkpoint_path, **kwargs)
    return FPNBackbone(body, out_channels=out_channels, extra_blocks=extra_blocks)
