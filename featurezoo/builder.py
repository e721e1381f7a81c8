"""``build_model_with_cfg``: the one place a model is built, optionally given
pretrained weights, and optionally wrapped for feature extraction.

Layer: imports :mod:`featurezoo.cfg`, :mod:`featurezoo.registry`,
:mod:`featurezoo.features` and :mod:`featurezoo.checkpoint`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence, Union

import torch.nn as nn

from .cfg import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ModelCfg, generate_default_cfgs, resolve_cfg
from .checkpoint import load_pretrained
from .features import FeatureExtractWrapper
from .registry import current_model_name

__all__ = ["ModelCfg", "build_model_with_cfg", "resolve_cfg", "generate_default_cfgs",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD"]

_logger = logging.getLogger(__name__)


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    pretrained: bool = False,
    default_cfg: Union[ModelCfg, Mapping[str, Any], None] = None,
    features_only: bool = False,
    out_indices: Union[Sequence[int], str, None] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls(**kwargs)``, load pretrained weights, wrap for features.

    This is the guide's calling convention: ``features_only`` and
    ``out_indices`` arrive among the model's keyword arguments and are taken
    out here, so the model class never sees them.

    Args:
        model_cls: the model class (or any callable returning an ``nn.Module``).
        pretrained: load the weights at ``default_cfg.url``.
        default_cfg: a :class:`ModelCfg` or a MindCV-style dict.
        features_only: return a :class:`FeatureExtractWrapper` instead.
        out_indices: which ``feature_info`` entries to output (see
            :func:`featurezoo.features.normalize_out_indices`); ``None`` = all.
    """
    cfg = resolve_cfg(default_cfg, name=current_model_name() or getattr(model_cls, "__name__", ""))
    if not features_only and out_indices is not None:
        raise ValueError(f"out_indices={out_indices!r} was given for {cfg.name} without features_only=True")
    model = model_cls(**kwargs)
    model.default_cfg = cfg

    if features_only:
        model = FeatureExtractWrapper(model, out_indices=out_indices, model_name=cfg.name)

    if pretrained:
        load_pretrained(
            model, cfg, num_classes=kwargs.get("num_classes", cfg.num_classes), in_channels=kwargs.get("in_channels", 3)
        )
    return model
