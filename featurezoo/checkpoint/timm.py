"""timm weights for featurezoo models whose architecture equals a timm model.

A model declares its twin and how timm's names become ours in its cfg
(:class:`featurezoo.cfg.ModelCfg`)::

    _cfg(url, timm_twin="resnet50", timm_renames=((r"\\.downsample\\.", ".down_sample."), (r"^fc\\.", "classifier.")))

Renames are regular expressions applied in order to every timm name; a family
whose conversion needs more than renaming (splitting, reshaping) declares
``timm_convert=fn`` (``state_dict -> state_dict``) instead.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ..cfg import ModelCfg
from .mapping import rename_by_rules

__all__ = ["convert_from_timm"]


def convert_from_timm(cfg: Optional[ModelCfg], state_dict: Mapping[str, torch.Tensor]
                      ) -> Optional[Dict[str, torch.Tensor]]:
    """timm's state dict under our names, or None if ``cfg`` declares no timm twin."""
    if cfg is None or not cfg.timm_twin:
        return None
    if cfg.timm_convert is not None:
        return cfg.timm_convert(dict(state_dict))
    return rename_by_rules(state_dict, cfg.timm_renames)
