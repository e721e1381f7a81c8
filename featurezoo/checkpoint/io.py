"""Reading and writing state dicts in every format a user has, safely.

``.pt/.pth/.bin`` go through ``torch.load(weights_only=True)``: a pickle that
would run code is refused, never executed. MindSpore ``.ckpt`` is parsed
without MindSpore.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from ..atomic import atomic_path, atomic_write
from .errors import CheckpointError
from .mindspore_ckpt import read_mindspore_ckpt, write_mindspore_ckpt

__all__ = ["read_state_dict", "write_state_dict", "unwrap_state_dict", "PathLike"]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

_TORCH_EXTS = (".pt", ".pth", ".bin", ".pkl", ".tar")
# Containers that training scripts wrap weights in, most specific first.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params", "weights")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, expected a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(e))
        if not blocked:
            raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint (corrupt pickle data)") from None
        raise CheckpointError(
            f"refused to load {str(path)!r}: it is a pickle that needs more than tensors and plain containers "
            f"(it may carry code), and featurezoo never runs code from a checkpoint. Re-save its state_dict "
            f"(torch.save(model.state_dict(), ...)) or use safetensors. It asks for {blocked.group(1) or blocked.group(2)}"
        ) from None
    except Exception as e:  # untrusted bytes: the unpickler fails in many ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def read_state_dict(path: PathLike) -> Any:
    """Read a checkpoint file into whatever it holds (usually a name->tensor dict)."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        return read_mindspore_ckpt(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in _TORCH_EXTS:
        return _read_torch(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return _read_torch(path)
    raise CheckpointError(
        f"cannot tell the format of {str(path)!r} from its extension {suffix!r}; valid: .ckpt (MindSpore), "
        f".safetensors, {', '.join(_TORCH_EXTS)} (PyTorch)"
    )


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, ema: bool = False, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Find the name->tensor dict inside what a training script saved.

    With ``ema=True`` an EMA container (``state_dict_ema``, ``model_ema``...)
    is taken; ``ema.``-prefixed keys are handled by the name mapping.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    if ema:
        for key in _EMA_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                _logger.info("using EMA weights from %r of %s", key, source)
                return unwrap_state_dict(obj[key], False, source)
    if _tensor_dict(obj):
        return dict(obj)
    for key in _NESTED_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return unwrap_state_dict(obj[key], False, source)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    raise CheckpointError(f"{source} holds no tensors (top-level keys: {list(obj)[:10]})")


def write_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write by extension (``.safetensors``, ``.pt/.pth/.bin``, ``.ckpt``), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if suffix == ".ckpt":
        write_mindspore_ckpt(tensors, path)
        return path
    if suffix not in (".safetensors",) + _TORCH_EXTS:
        raise ValueError(f"cannot save to {str(path)!r}: valid extensions .safetensors, .ckpt, {', '.join(_TORCH_EXTS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
    else:
        with atomic_write(path) as f:
            torch.save(tensors, f)
    return path
