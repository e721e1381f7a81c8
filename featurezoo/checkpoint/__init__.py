"""Checkpoints: reading every format safely, mapping names, loading, saving."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .errors import CheckpointError
from .hub import cache_dir, load_pretrained
from .io import PathLike, read_state_dict, write_state_dict
from .load import LoadReport, load_checkpoint

__all__ = ["CheckpointError", "LoadReport", "load_checkpoint", "save_checkpoint", "load_pretrained",
           "read_state_dict", "cache_dir"]


_MS_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _mindspore_names(model: nn.Module) -> dict:
    """Our state dict under MindSpore's names, as MindCV's own model would save it."""
    norms = {name for name, m in model.named_modules()
             if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))}
    out = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        out[f"{owner}.{_MS_LEAVES[leaf]}" if owner in norms and leaf in _MS_LEAVES else key] = tensor
    return out


def save_checkpoint(model: nn.Module, path: PathLike) -> Path:
    """Save ``model.state_dict()`` by extension: ``.safetensors`` (recommended),
    ``.pt/.pth/.bin``, or MindSpore ``.ckpt`` (under MindSpore's parameter names,
    so MindCV's ``load_checkpoint`` takes it). Written atomically."""
    if Path(path).suffix.lower() == ".ckpt":
        return write_state_dict(_mindspore_names(model), path)
    return write_state_dict(model.state_dict(), path)
