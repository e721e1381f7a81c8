"""Access to the cached MindCV reference outputs (no MindSpore needed).

The cache is produced by ``tools/mindcv_reference.py`` running under the MindCV
venv (``make refs``).  Layout::

    $FEATUREZOO_REF_CACHE (default ~/.cache/featurezoo/mindcv-ref)/
      mindcv-<MINDCV_VERSION>-ms-<MINDSPORE_VERSION>/
        <model>-<size>px-b<batch>-s<seed>/
          meta.json      # always present in a finished reference
          model.ckpt     # MindSpore checkpoint of the randomised net, kept when under 50 MB
          weights.npz    # its parameters under 65536 elements; larger ones are a recipe in meta.json
          outputs.npz    # input, logits[, output_1...][, feat_0, feat_1, ...]

``Reference.ckpt`` is ``model.ckpt`` where it was kept, else the same checkpoint rebuilt from ``meta.json``'s
recipes and ``weights.npz`` (``tools/synth_weights.py``) into a per-process temporary directory that holds at
most two such files and is removed when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

MINDCV_VERSION = "0.3.0"
MINDSPORE_VERSION = "2.10.0"
# must match FORMAT_VERSION in tools/mindcv_reference.py
REF_FORMAT_VERSION = 3
DEFAULT_SEED = 0
DEFAULT_BATCH = 2

REF_ROOT = Path(os.environ.get("FEATUREZOO_REF_CACHE") or Path.home() / ".cache" / "featurezoo" / "mindcv-ref")

_HOW_TO = "run `make refs` (tools/mindcv_reference.py under the MindCV venv) to create it"


def version_dir() -> Path:
    return REF_ROOT / f"mindcv-{MINDCV_VERSION}-ms-{MINDSPORE_VERSION}"


def reference_dir(model: str, size: int, batch: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED,
                  bn: str = "random") -> Path:
    suffix = "-bncal" if bn == "calibrated" else ""
    return version_dir() / f"{model}-{int(size)}px-b{int(batch)}-s{int(seed)}{suffix}"


@dataclass
class Reference:
    model: str
    size: int
    batch: int
    dir: Path
    meta: Dict[str, Any]
    input: np.ndarray
    logits: np.ndarray
    # one array per MindCV feature_info entry; None if MindCV has no features_only
    # for this model (or the feature run failed: see ``features_error``)
    features: Optional[List[np.ndarray]] = None
    # extra outputs if MindCV's eval forward returned a tuple (rare)
    extra_outputs: List[np.ndarray] = field(default_factory=list)

    @property
    def ckpt(self) -> Path:
        """The MindSpore checkpoint of the reference's net: the one MindSpore wrote, or its exact rebuild."""
        kept = self.dir / "model.ckpt"
        return kept if kept.is_file() else rebuilt_checkpoint(self.dir, self.meta)

    @property
    def features_error(self) -> Optional[str]:
        return self.meta.get("features_error")

    @property
    def feature_info(self) -> Optional[List[Dict[str, Any]]]:
        return self.meta.get("feature_info")

    @property
    def trainable_params(self) -> int:
        return self.meta["trainable_params"]

    @property
    def param_shapes(self) -> Dict[str, List[int]]:
        return self.meta["param_shapes"]


def load_meta(model: str, size: int, batch: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED,
              bn: str = "random") -> Dict[str, Any]:
    """meta.json of a reference; FileNotFoundError if missing or of an old format."""
    d = reference_dir(model, size, batch, seed, bn)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no MindCV reference for {model!r} ({size}px, batch {batch}) at {d}; {_HOW_TO}"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != REF_FORMAT_VERSION:
        raise FileNotFoundError(
            f"MindCV reference at {d} has format_version {meta.get('format_version')!r}, "
            f"expected {REF_FORMAT_VERSION}; stale cache: {_HOW_TO}"
        )
    return meta


def reference_available(model: str, size: int, batch: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED) -> bool:
    try:
        load_meta(model, size, batch, seed)
    except FileNotFoundError:
        return False
    return True


def load_reference(model: str, size: int, batch: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED,
                   bn: str = "random") -> Reference:
    """Load a cached MindCV reference.

    Raises FileNotFoundError (with a hint to run ``make refs``) if it is missing,
    and RuntimeError carrying MindCV's error text if MindCV could not build/run
    the model.
    """
    d = reference_dir(model, size, batch, seed, bn)
    meta = load_meta(model, size, batch, seed, bn)
    if meta.get("error"):
        raise RuntimeError(
            f"MindCV failed to produce a reference for {model!r} ({size}px) "
            f"at stage {meta.get('error_stage')!r}: {meta['error']}"
        )
    npz_path = d / "outputs.npz"
    for p in (npz_path, d / "weights.npz"):
        if not p.is_file():
            raise FileNotFoundError(f"MindCV reference at {d} is incomplete ({p.name} missing); {_HOW_TO}")
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    features = None
    n_feat = int(meta.get("num_features") or 0)
    if n_feat:
        features = [arrays[f"feat_{i}"] for i in range(n_feat)]
    extra = [arrays[f"output_{i}"] for i in range(1, int(meta.get("num_outputs") or 1))]
    return Reference(
        model=model,
        size=int(size),
        batch=int(batch),
        dir=d,
        meta=meta,
        input=arrays["input"],
        logits=arrays["logits"],
        features=features,
        extra_outputs=extra,
    )


def rebuilt_state(ref_dir: Path, meta: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The reference net's parameters in checkpoint order: small ones from ``weights.npz``, large ones
    regenerated from their recipes."""
    from tools.synth_weights import synthesise

    state = {}
    with np.load(ref_dir / "weights.npz") as small:
        for name, dtype, shape, recipe in meta["weights"]:
            value = small[name] if recipe is None else synthesise(name, shape, recipe, int(meta["seed"]))
            if str(value.dtype) != dtype or list(value.shape) != list(shape):
                raise ValueError(f"reference at {ref_dir}: {name!r} is {value.dtype}{list(value.shape)}, "
                                 f"meta.json says {dtype}{list(shape)}")
            state[name] = value
    return state


_REBUILT_KEEP = 2
_rebuilt_lock = threading.Lock()
_rebuilt: List[Path] = []  # most recent last
_rebuilt_dir: Optional[Path] = None


def rebuilt_checkpoint(ref_dir: Path, meta: Dict[str, Any]) -> Path:
    """``model.ckpt`` of a reference whose checkpoint was not kept, rebuilt into this process's temporary
    directory (the last two are kept there)."""
    global _rebuilt_dir
    from featurezoo.checkpoint.mindspore_ckpt import write_mindspore_ckpt

    with _rebuilt_lock:
        if _rebuilt_dir is None:
            _rebuilt_dir = Path(tempfile.mkdtemp(prefix="featurezoo-refckpt-"))
            atexit.register(shutil.rmtree, _rebuilt_dir, True)
        path = _rebuilt_dir / f"{ref_dir.name}.ckpt"
        if path in _rebuilt:
            _rebuilt.remove(path)
        else:
            while len(_rebuilt) >= _REBUILT_KEEP:
                _rebuilt.pop(0).unlink(missing_ok=True)
            write_mindspore_ckpt(rebuilt_state(ref_dir, meta), path)
        _rebuilt.append(path)
        return path
