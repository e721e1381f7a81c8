"""``build_model_with_cfg``: the one place a model is built, optionally given
pretrained weights, and optionally wrapped for feature extraction.

Layer: imports :mod:`featurezoo.cfg`, :mod:`featurezoo.validate`, :mod:`featurezoo.registry`,
:mod:`featurezoo.features` and :mod:`featurezoo.checkpoint`.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch.nn as nn

from .cfg import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ModelCfg, SideRule, generate_default_cfgs, resolve_cfg
from .checkpoint import load_pretrained
from .features import FeatureExtractWrapper
from .registry import current_model_name, model_module, models_with_output_stride
from .validate import check_builder_args, check_input_size, check_keywords

__all__ = ["ModelCfg", "SideRule", "build_model_with_cfg", "resolve_cfg", "generate_default_cfgs",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD"]

_logger = logging.getLogger(__name__)


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    pretrained: bool = False,
    default_cfg: Union[ModelCfg, Mapping[str, Any], None] = None,
    features_only: bool = False,
    out_indices: Union[Sequence[int], str, None] = None,
    output_stride: Optional[int] = None,
    as_dict: bool = False,
    level_names: Union[str, Sequence[str], None] = None,
    frozen_stages: int = -1,
    norm_eval: bool = False,
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
        output_stride: 8 or 16 to dilate the last stages instead of striding
            them (models whose cfg declares ``output_strides``); 32 or ``None``
            for the model as designed.
        as_dict, level_names, frozen_stages, norm_eval: feature models only;
            see :class:`featurezoo.features.FeatureExtractWrapper`.
    """
    cfg = resolve_cfg(default_cfg, name=current_model_name() or getattr(model_cls, "__name__", ""))
    check_builder_args(cfg.name, dict(kwargs, pretrained=pretrained, features_only=features_only))
    check_keywords(cfg.name, model_cls, kwargs, also_valid=_WRAPPER_KEYWORDS)
    if not features_only:
        given = {k: v for k, v in dict(out_indices=out_indices, as_dict=as_dict, level_names=level_names,
                                       frozen_stages=frozen_stages, norm_eval=norm_eval).items()
                 if v not in (None, False, -1)}
        if given:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} given for {cfg.name} without "
                             f"features_only=True; these options belong to feature models")
    if output_stride is not None:
        kwargs["output_stride"] = _check_output_stride(cfg, output_stride)
    model = model_cls(**kwargs)
    model.default_cfg = cfg
    if cfg.min_input_size or cfg.side_rules:
        model.register_forward_pre_hook(_InputSizeCheck(cfg))

    if features_only:
        model = FeatureExtractWrapper(model, out_indices=out_indices, model_name=cfg.name, as_dict=as_dict,
                                      level_names=level_names, frozen_stages=frozen_stages, norm_eval=norm_eval)

    if pretrained:
        load_pretrained(
            model, cfg, num_classes=kwargs.get("num_classes", cfg.num_classes), in_channels=kwargs.get("in_channels", 3)
        )
    return model


# The keywords build_model_with_cfg takes out before the model class sees the rest.
_WRAPPER_KEYWORDS = tuple(n for n in inspect.signature(build_model_with_cfg).parameters
                          if n not in ("model_cls", "default_cfg", "kwargs"))


class _InputSizeCheck:
    """Forward pre-hook refusing input sizes the cfg declares invalid (a class, not a closure,
    so the model still pickles and deep-copies). The feature wrapper makes the same check."""

    def __init__(self, cfg: ModelCfg):
        self.cfg = cfg

    def __call__(self, module: nn.Module, args: Any) -> None:
        if args:
            check_input_size(self.cfg, args[0], self.cfg.name)


def _check_output_stride(cfg: ModelCfg, output_stride: Any) -> int:
    if isinstance(output_stride, bool) or output_stride not in (8, 16, 32):
        raise ValueError(f"{cfg.name}: output_stride={output_stride!r} is not valid; use 8, 16 or 32")
    if output_stride not in cfg.output_strides:
        able = sorted({model_module(n) for n in models_with_output_stride()})
        raise ValueError(f"{cfg.name} does not support output_stride={output_stride}"
                         + (f" (it supports {list(cfg.output_strides)})" if cfg.output_strides else
                            ": its stages cannot trade stride for dilation")
                         + f". Families that support output_stride: {', '.join(able)}")
    return output_stride
