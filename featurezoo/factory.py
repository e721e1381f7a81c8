"""``create_model``: MindCV's signature and meaning, on PyTorch.

Layer: imports :mod:`featurezoo.registry`, :mod:`featurezoo.validate` and :mod:`featurezoo.checkpoint`; the
builders it calls (family modules) use :mod:`featurezoo.builder`.
"""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import torch.nn as nn

from .checkpoint import load_checkpoint
from .registry import call_builder
from .validate import check_builder_args

__all__ = ["create_model"]


def create_model(
    model_name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    in_channels: int = 3,
    checkpoint_path: str = "",
    ema: bool = False,
    auto_mapping: bool = False,
    features_only: bool = False,
    out_indices: Union[Sequence[int], str, None] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a registered model by name.

    Args:
        model_name: a name from :func:`featurezoo.list_models`.
        num_classes: classifier outputs (ignored by feature models).
        pretrained: load the model's published weights (downloaded and cached).
        in_channels: input channels.
        checkpoint_path: a checkpoint to load (``.ckpt``, ``.pt/.pth/.bin``,
            ``.safetensors``); excludes ``pretrained``.
        ema: take the ``ema.``-prefixed weights of the checkpoint.
        auto_mapping: map checkpoint names that differ from ours (flattened
            ``features_0.`` names, ``module.``/``backbone.`` prefixes, ...).
        features_only: return a backbone that outputs a list of feature maps.
        out_indices: which ``feature_info`` entries to output: ints (negative
            count from the end), ``None`` for all, or ``"pyramid"`` for the last
            entry at each distinct reduction.
        **kwargs: passed to the model's builder; ``None`` values are dropped
            (as MindCV does).

    >>> m = create_model("resnet18", features_only=True, out_indices=[1, 2, 3, 4])
    >>> m.out_channels
    [64, 128, 256, 512]
    """
    check_builder_args(str(model_name), dict(ema=ema, auto_mapping=auto_mapping))
    if not isinstance(checkpoint_path, (str, os.PathLike)):
        raise ValueError(f"checkpoint_path={checkpoint_path!r} is not valid; use a path (str) or '' for none")
    if checkpoint_path and pretrained:
        raise ValueError("checkpoint_path and pretrained=True are mutually exclusive; pass one of them")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if features_only or out_indices is not None:
        kwargs.update(features_only=features_only, out_indices=out_indices)
    model = call_builder(model_name, pretrained=pretrained, num_classes=num_classes, in_channels=in_channels,
                         **kwargs)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path, ema=ema, auto_mapping=auto_mapping)
    return model
