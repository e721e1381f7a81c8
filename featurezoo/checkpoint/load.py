"""``load_checkpoint``: all checks first, then one copy, so a failed load
leaves the model exactly as it was.

The checks, in order: every key a ``str`` and every value a dense tensor with
data (:func:`featurezoo.validate.check_state_dict`, before any name is mapped);
names; dtypes that convert meaningfully (:func:`featurezoo.validate.check_tensor_kinds`);
shapes; missing and unexpected names. Each failure is a :class:`CheckpointError`
(a ``ValueError``) naming the offending keys.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..cfg import ModelCfg
from ..registry import build_on_meta, get_model_cfg, is_model, list_models, model_module
from ..validate import check_state_dict, check_tensor_kinds
from .errors import CheckpointError
from .io import PathLike, read_state_dict, unwrap_state_dict
from .mapping import candidate_names, map_names, rename_by_rules
from .timm import convert_from_timm

__all__ = ["LoadReport", "load_checkpoint", "adapt_input_conv"]

_logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a load did. ``loaded`` are model names that received a tensor."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    remapped: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped_head: List[str] = field(default_factory=list)
    skipped_unused: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        for label in ("missing", "unexpected", "remapped", "skipped_head", "skipped_unused", "ignored", "adapted"):
            n = len(getattr(self, label))
            if n:
                parts.append(f"{label.replace('_', ' ')} {n}")
        return "LoadReport(" + ", ".join(parts) + ")"


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-conv weight trained on RGB to ``in_channels`` inputs:
    1 channel sums the RGB filters; more repeats them and rescales so the
    expected activation is unchanged."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _model_cfg(model: nn.Module) -> Tuple[str, Optional[ModelCfg]]:
    """The model's name and cfg: the cfg it was built with, else its registered one."""
    cfg = getattr(model, "default_cfg", None)
    cfg = cfg if isinstance(cfg, ModelCfg) else None
    name = getattr(model, "model_name", None) or (cfg.name if cfg else "") or type(model).__name__
    if cfg is None and is_model(name):
        cfg = get_model_cfg(name)
    return name, cfg


def _is_under(key: str, modules: Tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


_SOURCES = ("auto", "featurezoo", "mindcv", "timm")


def load_checkpoint(model: nn.Module, checkpoint: Union[PathLike, Mapping[str, Any]], *, ema: bool = False,
                    auto_mapping: bool = False, strict: bool = True, source: str = "auto") -> LoadReport:
    """Load a checkpoint (path or state dict) into ``model`` (full or feature model).

    * Names: MindSpore names map by fixed rules; ``auto_mapping=True`` also
      accepts prefixed and MindCV-flattened names and unique equal-shape pairs.
    * Head: a feature model ignores classifier weights; a classifier with a
      different ``num_classes`` keeps its own (reported as ``skipped_head``).
    * ``source``: ``"timm"`` converts timm's names for models with a timm twin;
      ``"auto"`` (default) does so when the names are timm's and not ours.
    * Errors (``CheckpointError``, model untouched): unreadable file, a key that
      is not a ``str``, a value that is not a dense tensor with data (meta,
      sparse, quantized), a dtype of the wrong kind (bool or int into a float
      parameter), shape mismatch, and, when ``strict``, missing or unexpected names.
    """
    if source not in _SOURCES:
        raise ValueError(f"source={source!r}; valid: {list(_SOURCES)}")
    name, cfg = _model_cfg(model)
    heads = cfg.classifier_names if cfg else ()
    first_conv = cfg.first_conv if cfg else ""
    full_keys = getattr(model, "full_state_keys", None)
    where = f"checkpoint {str(checkpoint)!r}" if not isinstance(checkpoint, Mapping) else "state dict"
    raw = checkpoint if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
    state = unwrap_state_dict(raw, ema=ema, source=where)
    check_state_dict(state, where, CheckpointError)

    own = model.state_dict()
    shapes = {k: v.shape for k, v in own.items()}
    state, converted = _maybe_from_timm(name, cfg, state, shapes, source)
    state, fixed = _mindcv_renames(cfg, state)
    converted += fixed
    mapping = map_names(state, shapes, ema=ema and not _has_ema_container(raw), auto_mapping=auto_mapping,
                        model_name=name)
    report = LoadReport(remapped=converted + mapping.remapped, ignored=mapping.training_state + mapping.ema_dropped)

    check_tensor_kinds(mapping.mapped, own, name, where, CheckpointError)
    to_load: Dict[str, torch.Tensor] = {}
    mismatched: List[str] = []
    in_chs = None
    for key, tensor in mapping.mapped.items():
        want = shapes[key]
        if tensor.shape == want:
            to_load[key] = tensor
        elif _is_under(key, heads):
            report.skipped_head.append(key)
        elif first_conv and key == f"{first_conv}.weight" and tensor.dim() == 4 and tensor.shape[0] == want[0] \
                and tensor.shape[2:] == want[2:]:
            in_chs = want[1]
            to_load[key] = adapt_input_conv(tensor, in_chs)
            report.adapted.append(key)
        else:
            mismatched.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(want)}")
    if mismatched:
        raise CheckpointError(
            f"{name}: {len(mismatched)} shape mismatch(es) loading {where}, nothing was loaded:\n  "
            + "\n  ".join(mismatched[:20]) + _looks_like(name, state)
        )
    if report.skipped_head:
        _logger.warning("%s: classifier weights %s do not fit (different num_classes); the head keeps its "
                        "initialisation", name, report.skipped_head)

    for key in mapping.unmatched:
        if _is_under(key, heads):
            report.skipped_head.append(key)
        elif full_keys is not None and any(c in full_keys for c, _ in candidate_names(key, auto_mapping)):
            report.skipped_unused.append(key)
        else:
            report.unexpected.append(key)
    report.missing = [k for k in own if k not in to_load and k not in report.skipped_head
                      and not k.endswith("num_batches_tracked")]
    # A backbone-only checkpoint (saved from a feature model) may fill a classifier: its head stays as built.
    missing_body = [k for k in report.missing if not _is_under(k, heads)]
    if len(missing_body) < len(report.missing):
        _logger.warning("%s: %s has no classifier weights; the head keeps its initialisation", name, where)
    if strict and (missing_body or report.unexpected):
        hint = "" if auto_mapping else "; if the names differ only by prefix or flattening, pass auto_mapping=True"
        raise CheckpointError(
            f"{name}: {where} does not fit, nothing was loaded: {len(missing_body)} missing "
            f"{missing_body[:8]}, {len(report.unexpected)} unexpected {report.unexpected[:8]}{hint}"
            + _looks_like(name, state)
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    _logger.info("%s: %s from %s", name, report, where)
    return report


def _has_ema_container(raw: Any) -> bool:
    return isinstance(raw, Mapping) and any(k in raw for k in ("state_dict_ema", "model_ema", "ema_state_dict"))



def _maybe_from_timm(name: str, cfg: Optional[ModelCfg], state: Dict[str, torch.Tensor],
                     shapes: Mapping[str, torch.Size], source: str
                     ) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str, str]]]:
    """Convert timm names when asked, or when they fit the model better than the names as given."""
    if source not in ("timm", "auto"):
        return state, []
    converted = convert_from_timm(cfg, state)
    if converted is None:
        if source == "timm":
            raise CheckpointError(f"{name} has no timm twin; source='timm' is not available for it")
        return state, []
    if source == "auto":
        fits = lambda sd: sum(1 for k in sd if k in shapes)  # noqa: E731
        if fits(converted) <= fits(state):
            return state, []
    twin = cfg.timm_twin
    renamed = [(old, new, f"timm {twin}") for old, new in zip(state, converted) if old != new]
    _logger.info("%s: converting timm %s names (%d renamed)", name, twin, len(renamed))
    return converted, renamed


def _mindcv_renames(cfg: Optional[ModelCfg], state: Dict[str, torch.Tensor]
                    ) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str, str]]]:
    """The cfg's ``mindcv_renames``: MindSpore parameter names that are not the module paths of
    MindCV's own code (RegNet's stages), mapped by fixed rules."""
    rules = cfg.mindcv_renames if cfg else ()
    if not rules:
        return state, []
    renamed = rename_by_rules(state, rules)
    return renamed, [(old, new, "MindCV names") for old, new in zip(state, renamed) if old != new]


def _looks_like(name: str, state: Mapping[str, torch.Tensor]) -> str:
    """Name the model of ``name``'s family whose every tensor the checkpoint holds, if one does
    (a resnet18 file given to resnet50). Built on the meta device: no weights are allocated."""
    if not is_model(name):
        return ""
    wanted = {}
    for key, tensor in state.items():
        for cand, _ in candidate_names(key, False):
            wanted[cand] = tuple(tensor.shape)
    for other in list_models(module=model_module(name)):
        if other == name:
            continue
        shapes = {k: tuple(v.shape) for k, v in build_on_meta(other).state_dict().items()
                  if not k.endswith("num_batches_tracked")}
        if shapes and all(wanted.get(k) == v for k, v in shapes.items()):
            return f"\n  the checkpoint looks like {other}: create_model({other!r}) fits it"
    return ""
