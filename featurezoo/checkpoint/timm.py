"""timm weights for featurezoo models whose architecture equals a timm model.

A family module declares its twins and how timm's names become ours::

    TIMM_TWINS = {"resnet50": "resnet50", ...}               # our name -> timm name
    TIMM_RENAMES = ((r"\\.downsample\\.", ".down_sample."), (r"^fc\\.", "classifier."))

Renames are regular expressions applied in order to every timm name; a family
whose conversion needs more than renaming (splitting, reshaping) may define
``convert_from_timm(state_dict) -> state_dict`` instead.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Dict, Mapping, Optional

import torch

from ..registry import is_model, model_entrypoint
from .mapping import rename_by_rules

__all__ = ["timm_twin", "convert_from_timm", "family_module"]


def family_module(model_name: str) -> Optional[ModuleType]:
    """The module that registered ``model_name`` (where its timm declarations live)."""
    if not model_name or not is_model(model_name):
        return None
    return sys.modules.get(model_entrypoint(model_name).__module__)


def timm_twin(model_name: str) -> Optional[str]:
    """The timm model with the same architecture, or None."""
    module = family_module(model_name)
    return getattr(module, "TIMM_TWINS", {}).get(model_name) if module else None


def convert_from_timm(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """timm's state dict under our names, or None if the family has no timm twin."""
    module = family_module(model_name)
    if module is None or model_name not in getattr(module, "TIMM_TWINS", {}):
        return None
    custom = getattr(module, "convert_from_timm", None)
    if custom is not None:
        return custom(dict(state_dict))
    return rename_by_rules(state_dict, getattr(module, "TIMM_RENAMES", ()))
