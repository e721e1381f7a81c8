"""What ``featurezoo list`` and ``featurezoo info`` report, computed on the meta
device: shapes, parameters and FLOPs without allocating a single weight.

FLOPs are counted by torch's own ``torch.utils.flop_counter.FlopCounterMode``
(a multiply-add counts 2; ops it has no formula for, such as elementwise ones,
count 0). Facts the cfg holds (weights URL, input size) are read from the
registry without building anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..cfg import ModelCfg
from ..discovery import discover, import_factory, is_factory_path
from ..features import PYRAMID
from ..registry import build_on_meta, get_model_cfg, supports_features

__all__ = ["ModelRow", "LevelRow", "ChoiceRow", "ModelReport", "model_row", "model_report", "count_params",
           "meta_flops"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_flops(model: nn.Module, size: Tuple[int, int], in_chans: int = 3) -> Tuple[int, list]:
    """FLOPs of one forward at ``size`` (batch 1) on the meta device, and the output shapes."""
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(1, in_chans, *size)
        counter = FlopCounterMode(display=False)
        with counter:
            out = model.eval()(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return counter.get_total_flops(), [tuple(o.shape[1:]) for o in outs]


@dataclass
class ModelRow:
    """One line of ``featurezoo list``."""

    name: str
    params: int  # of the feature model with every level (the classifier's if no features)
    levels: Optional[int]  # None: no features_only support
    reductions: List[int]
    pretrained: bool


def model_row(name: str) -> ModelRow:
    pretrained = bool(get_model_cfg(name).url)
    try:  # one meta build for the usual case (supports_features would build the classifier first)
        model = build_on_meta(name, features_only=True)
    except ValueError:
        if supports_features(name):
            raise
        return ModelRow(name, count_params(build_on_meta(name)), None, [], pretrained)
    info = model.feature_info
    return ModelRow(name, count_params(model), len(info), info.reduction(), pretrained)


@dataclass
class LevelRow:
    index: int
    name: str
    chs: int
    reduction: int
    shape: Tuple[int, ...]  # (C, H, W) at the asked size
    params: int  # held by the feature model whose deepest output is this level
    flops: int


@dataclass
class ChoiceRow:
    label: str
    indices: Optional[List[int]]  # None for the classifier
    params: int
    flops: int


@dataclass
class ModelReport:
    name: str
    cfg: ModelCfg
    size: Tuple[int, int]
    levels: List[LevelRow]
    choices: List[ChoiceRow]


def _factory_builders(spec: str, size: Optional[Tuple[int, int]]):
    """``(cfg, feature_model(out_indices), classifier)`` for a model factory ``pkg.module:fn``, on the
    meta device; levels discovered once (again per build where the hooks method pruned the model)."""
    fn = import_factory(spec)
    input_size = (3, *size) if size is not None else (3, 224, 224)
    with torch.device("meta"):
        classifier = fn().eval()
    found = discover(classifier, input_size, model_name=spec)

    def feature_model(out_indices):
        nonlocal found
        if found.method == "hooks":  # prunes its model in place: a fresh one each time
            with torch.device("meta"):
                found = discover(fn().eval(), input_size, model_name=spec, method="hooks")
        return found.backbone(out_indices)

    return found.cfg, feature_model, classifier


def model_report(name: str, size: Optional[Tuple[int, int]] = None,
                 out_indices: Union[Sequence[int], str, None] = None) -> ModelReport:
    """Everything ``featurezoo info`` prints, for ``name`` (a registered name or a model factory
    ``pkg.module:fn``) at ``size`` (default: the cfg's)."""
    if is_factory_path(name):
        cfg, feature_model, classifier = _factory_builders(name, size)
        classifier_flops = meta_flops(classifier, size or tuple(cfg.input_size[1:]), cfg.input_size[0])[0]
        classifier_params = count_params(classifier)
    else:
        cfg = get_model_cfg(name)
        feature_model = lambda idx: build_on_meta(name, features_only=True, out_indices=idx)  # noqa: E731
        classifier = build_on_meta(name)
        classifier_flops, classifier_params = None, None
    full = feature_model(None)
    size = tuple(size) if size is not None else tuple(cfg.input_size[1:])
    in_chans = cfg.input_size[0]
    info = full.feature_info  # built with out_indices=None: every entry
    _, shapes = meta_flops(full, size, in_chans)
    levels = []
    for i, entry in enumerate(info):
        single = feature_model([i])
        flops, _ = meta_flops(single, size, in_chans)
        levels.append(LevelRow(i, entry["name"], entry["chs"], entry["reduction"], shapes[i], count_params(single),
                               flops))
    choices = []
    asked = [("all (default)", None), (PYRAMID, PYRAMID)]
    if out_indices is not None and out_indices != PYRAMID:
        asked.insert(0, (",".join(str(i) for i in out_indices), list(out_indices)))
    for label, choice in asked:
        model = feature_model(choice)
        flops, _ = meta_flops(model, size, in_chans)
        choices.append(ChoiceRow(label, list(model.out_indices), count_params(model), flops))
    if classifier_flops is None:
        classifier_flops, _ = meta_flops(classifier, size, in_chans)
        classifier_params = count_params(classifier)
    choices.append(ChoiceRow("classifier (not features_only)", None, classifier_params, classifier_flops))
    return ModelReport(name, cfg, size, levels, choices)
