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


def save_checkpoint(model: nn.Module, path: PathLike) -> Path:
    """Save ``model.state_dict()`` by extension: ``.safetensors`` (recommended),
    ``.pt/.pth/.bin``, or MindSpore ``.ckpt``. Written atomically."""
    return write_state_dict(model.state_dict(), path)
