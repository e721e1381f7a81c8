"""What every extraction engine shares: the checks, the settings, the output directory, the summary.

An engine (:mod:`.run` for one machine, :mod:`.ray_engine` for a Ray cluster)
runs the same four steps, each implemented once here:

1. :func:`check_arguments` checks everything that can be wrong with the
   arguments (model, indices, dtype, device, checkpoint, size) without
   touching the inputs or the output directory;
2. :func:`list_inputs` lists and sorts the inputs (an engine may hand it its
   own lister, run elsewhere, as long as it returns what
   :func:`~featurezoo.extract.data.collect_inputs` would);
3. :func:`prepare` derives the stored settings and opens the output directory,
   refusing different settings (:class:`~featurezoo.extract.store.FeatureStore`);
4. after the engine has written its batches, :func:`finish` records the run in
   ``meta.json`` and returns the :class:`ExtractSummary`.

Layer: application (the extraction library; imports the library below it).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import numbers
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import safetensors
import torch
import torch.nn as nn

from .. import __version__
from .._optional import require
from ..cfg import ModelCfg
from ..checkpoint import load_checkpoint
from ..discovery import import_factory, is_factory_path, wrap
from ..factory import create_model
from ..inference import optimize_for_inference
from ..registry import build_on_meta
from .data import ExtractError, PathLike, Preprocess, collect_inputs, looks_like_images, pillow
from .store import DEFAULT_LAYOUT, LAYOUTS, FeatureStore, existing_layout, inputs_digest

__all__ = ["Job", "Plan", "ExtractSummary", "check_arguments", "list_inputs", "prepare", "already_complete",
           "finish", "build_feature_model", "probe_model", "weights_setting", "resolve_dtype", "resolve_device",
           "pool_features", "versions", "progress_bar", "num_threads", "POOLS", "DTYPES", "RANDOM_INIT_SEED",
           "OutIndices", "Lister", "MAX_SIZE", "check_size"]

_logger = logging.getLogger(__name__)

POOLS = ("none", "avg", "max")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The largest --size (each side). At 4096x4096 one image is 0.2 GB as the float32 model input and a
# stride-4 level of 64-256 channels 0.27-1.07 GB, per image and before the other activations: 16 times the
# pixels of 1024 (detection backbones run at up to 1333x800) and 83 times those of the largest default input
# of a registered model (448x448). Unbounded, --size 100000 ran the machine out of memory (issue 15).
MAX_SIZE = 4096
# Without weights (no checkpoint, not pretrained) a model is initialised from this seed, so that a
# resumed run, and every model worker of a cluster, computes the same features.
RANDOM_INIT_SEED = 0

OutIndices = Union[Sequence[int], str, None]
# (inputs as given, folders to leave out) -> the sorted, de-duplicated absolute paths
Lister = Callable[[List[PathLike], List[str]], List[str]]


@dataclass
class ExtractSummary:
    """What one call of :func:`~featurezoo.extract.extract_features` did."""

    out_dir: Path
    inputs: int  # input files, images or not
    images: int  # rows in OUT now
    skipped: int  # inputs listed as skipped in OUT now
    new_images: int  # rows written by this call
    new_skipped: int
    resumed_batches: int  # batches found done when this call started
    seconds: float  # the extraction loop (after the model was built; with Ray, from the pipeline's start)
    complete: bool
    workers: int = 0  # decoding processes used (local engine)
    engine: str = "local"
    model_workers: int = 0  # model actors (Ray engine)
    nodes: int = 1  # machines the run used (Ray engine: alive nodes of the cluster)

    @property
    def rate(self) -> float:
        return (self.new_images + self.new_skipped) / self.seconds if self.seconds > 0 else 0.0


# -- argument checks ------------------------------------------------------------------------------
def resolve_dtype(dtype: Union[str, torch.dtype], what: str = "dtype") -> Tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ExtractError(f"{what} {dtype} is not supported; valid: {', '.join(DTYPES)}")
        return names[dtype], dtype
    if dtype not in DTYPES:
        raise ExtractError(f"{what} {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    return dtype, DTYPES[dtype]


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ExtractError(f"device {device!r} is not valid; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ExtractError(f"device {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise ExtractError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def check_size(size: Optional[Tuple[int, int]]) -> None:
    """:class:`ExtractError` unless ``size`` is ``None`` (the model's) or ``(H, W)`` with sides in 1..MAX_SIZE."""
    if size is None:
        return
    ok = (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size))
    if not ok or not all(0 < v for v in size):
        raise ExtractError(f"size must be (H, W) with positive integers, got {size!r}")
    if max(size) > MAX_SIZE:
        raise ExtractError(f"size {size[0]}x{size[1]} is too large: at most {MAX_SIZE} pixels a side (one "
                           f"{MAX_SIZE}x{MAX_SIZE} image already needs gigabytes of activations); pass a smaller "
                           f"size (--size)")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_setting(checkpoint_path: PathLike = "", pretrained: bool = False) -> Dict[str, Any]:
    """How the model's weights are chosen, as recorded in ``meta.json``."""
    if checkpoint_path and pretrained:
        raise ExtractError("--checkpoint and --pretrained are mutually exclusive; pass one of them")
    if checkpoint_path:
        path = os.path.abspath(os.fspath(checkpoint_path))
        if not os.path.isfile(path):
            raise ExtractError(f"checkpoint {os.fspath(checkpoint_path)!r} does not exist")
        return {"source": "checkpoint", "path": path, "sha256": _file_sha256(path)}
    if pretrained:
        return {"source": "pretrained"}
    return {"source": "random-init", "seed": RANDOM_INIT_SEED}


def _factory_model(spec: str) -> nn.Module:
    """The model the factory ``spec`` (``"pkg.module:fn"``) returns, called without arguments."""
    model = import_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ExtractError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _discovery_size(size: Optional[Tuple[int, int]]) -> Tuple[int, int, int]:
    return (3, *size) if size is not None else (3, 224, 224)


def probe_model(model_name: str, out_indices: OutIndices, size: Optional[Tuple[int, int]] = None):
    """Build the feature model on the meta device (no weights) and run it at ``size``.

    ``model_name`` is a registered name or an import path to a model factory
    (``"torchvision.models:resnet50"``), whose levels :func:`featurezoo.wrap` discovers
    at ``size`` (default 224x224).

    Returns ``(feature_info, out_indices, cfg, shapes)`` with shapes ``(C, H, W)``
    per selected level. Raises ``ValueError`` for an unknown model or bad indices.
    """
    if is_factory_path(model_name):
        with torch.device("meta"):
            model = wrap(_factory_model(model_name), out_indices, _discovery_size(size), model_name=model_name)
    else:
        model = build_on_meta(model_name, features_only=True, out_indices=out_indices)
    cfg = model.default_cfg
    h, w = size if size is not None else tuple(cfg.input_size[1:])
    with torch.device("meta"), torch.no_grad():
        try:
            outs = model.eval()(torch.empty(1, cfg.input_size[0], h, w))
        except RuntimeError as e:
            raise ExtractError(f"{model_name} cannot run at {h}x{w}: {str(e).splitlines()[0]}") from None
    shapes = [tuple(int(s) for s in o.shape[1:]) for o in outs]
    return model.feature_info, list(model.out_indices), cfg, shapes


def build_feature_model(model_name: str, out_indices: OutIndices = None, checkpoint_path: PathLike = "",
                        pretrained: bool = False, size: Optional[Tuple[int, int]] = None, *,
                        eager: bool = False) -> nn.Module:
    """The feature model, in eval mode, with the weights :func:`extract_features` would use: on the
    inference path (:func:`featurezoo.optimize_for_inference`, float32, outputs within 1e-5 of the
    eager model's largest value) unless ``eager``.

    Without a checkpoint or ``pretrained`` it is initialised from
    :data:`RANDOM_INIT_SEED` (the caller's RNG state is left alone). A factory's
    model (``"pkg.module:fn"``) loads the checkpoint before its levels are
    discovered at ``size`` (default 224x224), so the checkpoint is the model's own.
    """
    if is_factory_path(model_name):
        if pretrained:
            raise ExtractError(f"{model_name} is a model factory: featurezoo knows no published weights for it; "
                               f"pass --checkpoint")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _factory_model(model_name)
        if checkpoint_path:
            load_checkpoint(model, os.fspath(checkpoint_path))
        return _inference(wrap(model, out_indices, _discovery_size(size), model_name=model_name).eval(), eager)
    kwargs = dict(features_only=True, out_indices=out_indices)
    if checkpoint_path:
        model = create_model(model_name, checkpoint_path=os.fspath(checkpoint_path), **kwargs)
    elif pretrained:
        model = create_model(model_name, pretrained=True, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = create_model(model_name, **kwargs)
    return _inference(model.eval(), eager)


def _inference(model: nn.Module, eager: bool) -> nn.Module:
    if not isinstance(eager, bool):
        raise ExtractError(f"eager must be True or False, got {eager!r}")
    return model if eager else optimize_for_inference(model, inplace=True)


def versions() -> Dict[str, str]:
    """The versions that made a run, as recorded in ``meta.json``."""
    PIL = require("PIL", "cli", "featurezoo.extract")
    return {"featurezoo": __version__, "torch": torch.__version__, "pillow": PIL.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


@dataclass
class Job:
    """The checked arguments of one run, before its inputs are listed."""

    model_name: str
    indices: List[int]
    info: Any  # FeatureInfo of the selected levels
    cfg: ModelCfg
    shapes: List[Tuple[int, ...]]  # (C, H, W) per selected level
    preprocess: Preprocess
    pool: str
    batch_size: int
    dtype_name: str
    dtype: torch.dtype  # the model's
    device: torch.device  # where the model runs (on a Ray cluster: on the model workers)
    checkpoint_path: PathLike
    pretrained: bool
    weights: Dict[str, Any]
    out_dir: str  # absolute
    given: List[PathLike]  # the inputs as given
    store_dtype_name: str = "float32"
    store_dtype: torch.dtype = torch.float32  # the stored features' (the model's dtype unless asked otherwise)
    layout: Optional[str] = None  # the stored maps' layout as asked (None: a resumed run's, else DEFAULT_LAYOUT)


def check_arguments(model_name: str, inputs: Iterable[PathLike], out_dir: PathLike, *, device: torch.device,
                    out_indices: OutIndices = None, pool: str = "none", batch_size: int = 32,
                    dtype: Union[str, torch.dtype] = "float32", checkpoint_path: PathLike = "",
                    pretrained: bool = False, size: Optional[Tuple[int, int]] = None,
                    jpeg_draft: bool = True, store_dtype: Union[str, torch.dtype, None] = None,
                    layout: Optional[str] = None) -> Job:
    """Everything that can be wrong with the arguments, as :class:`ExtractError`; reads no input, writes nothing.

    ``device`` is resolved by the engine (a Ray engine's model runs on its workers, not here).
    ``store_dtype`` (default: ``dtype``) is the dtype the features are stored in; ``layout``
    (``"nhwc"``/``"nchw"``, unpooled maps only) how maps are stored.
    """
    pillow()
    if pool not in POOLS:
        raise ExtractError(f"pool {pool!r} is not valid; use one of {', '.join(POOLS)}")
    if layout is not None and layout not in LAYOUTS:
        raise ExtractError(f"layout {layout!r} is not valid; use one of {', '.join(LAYOUTS)}")
    if layout is not None and pool != "none":
        raise ExtractError(f"layout {layout!r} is for unpooled maps; with pool {pool!r} the features are (C,) "
                           f"vectors: leave layout out")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractError(f"batch size must be a positive integer, got {batch_size!r}")
    dtype_name, torch_dtype = resolve_dtype(dtype)
    check_size(size)
    store_name, store_torch = (dtype_name, torch_dtype) if store_dtype is None else \
        resolve_dtype(store_dtype, "store dtype")
    info, indices, cfg, shapes = probe_model(model_name, out_indices, size)
    preprocess = Preprocess.from_cfg(cfg, size, jpeg_draft=jpeg_draft)
    weights = weights_setting(checkpoint_path, pretrained)
    if weights["source"] == "pretrained":
        if not cfg.url:
            raise ExtractError(f"{model_name} has no published weights; pass --checkpoint instead")
        weights["url"] = cfg.url
    given = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not given:
        raise ExtractError("no inputs given")
    return Job(model_name, indices, info, cfg, shapes, preprocess, pool, batch_size, dtype_name, torch_dtype,
               device, checkpoint_path, pretrained, weights, os.path.abspath(os.fspath(out_dir)), given,
               store_name, store_torch, layout)


def list_inputs(job: Job, lister: Lister = collect_inputs) -> List[str]:
    """The sorted inputs of ``job`` (listed by ``lister``); :class:`ExtractError` if none is an image."""
    paths = lister(job.given, [job.out_dir])
    where = ", ".join(os.fspath(g) for g in job.given[:3]) + (", ..." if len(job.given) > 3 else "")
    if not paths:
        raise ExtractError(f"no images found in {where}")
    if not looks_like_images(paths):
        raise ExtractError(f"no images found in {where} ({len(paths)} file(s), none of them an image)")
    return paths


@dataclass
class Plan:
    """A run ready to start: its job, inputs, stored levels and the opened (not yet written) output directory."""

    job: Job
    paths: List[str]
    levels: List[Dict[str, Any]]
    store: FeatureStore
    overwrite: bool

    @property
    def level_keys(self) -> List[str]:
        return [lv["key"] for lv in self.levels]


def prepare(job: Job, paths: List[str], overwrite: bool = False) -> Plan:
    """The settings of ``job`` over ``paths``, and its output directory opened against them (nothing written)."""
    names = [entry["name"] for entry in job.info]
    levels = []
    for idx, entry, shape in zip(job.indices, job.info, job.shapes):
        stored = shape if job.pool == "none" else shape[:1]
        # the tensor's name in the shards: the module's, unless two levels share a module
        key = entry["name"] if names.count(entry["name"]) == 1 else f"{idx}:{entry['name']}"
        levels.append({"index": idx, "name": entry["name"], "key": key, "chs": entry["chs"],
                       "reduction": entry["reduction"], "shape": list(stored)})
    settings = {
        "model": job.model_name,
        "weights": job.weights,
        "out_indices": job.indices,
        "pool": job.pool,
        "dtype": job.dtype_name,
        "device": job.device.type,
        "size": list(job.preprocess.size),
        "preprocessing": job.preprocess.to_dict(),
        "batch_size": job.batch_size,
        "inputs": {"count": len(paths), "sha256": inputs_digest(paths)},
        "levels": levels,
    }
    if job.store_dtype_name != job.dtype_name:  # recorded only when asked for: older directories still resume
        settings["store_dtype"] = job.store_dtype_name
    if job.pool == "none":
        layout = job.layout or (None if overwrite else existing_layout(job.out_dir)) or DEFAULT_LAYOUT
        if layout != "nchw":  # recorded only when not NCHW: version 1 directories (all NCHW) still resume
            settings["layout"] = layout
    store = FeatureStore.open(job.out_dir, settings, paths, job.batch_size, overwrite=overwrite)
    return Plan(job, paths, levels, store, overwrite)


def already_complete(plan: Plan, engine: str) -> Optional[ExtractSummary]:
    """The summary of a run with nothing left to do, or ``None``."""
    store = plan.store
    if not store.finished or plan.overwrite:  # a first look; the engine's store.begin() looks again under the lock
        return None
    counts = store.counts()
    _logger.info("%s: already complete (%d rows), nothing to do", store.out, counts["rows"])
    return ExtractSummary(store.out, len(plan.paths), counts["rows"], counts["skipped"], 0, 0,
                          store.state.done_batches, 0.0, True, engine=engine)


def warn_random_init(job: Job) -> None:
    if job.weights["source"] == "random-init":
        _logger.warning("%s: no weights given (checkpoint or pretrained); features come from a randomly "
                        "initialised model (seed %d)", job.model_name, RANDOM_INIT_SEED)


def finish(plan: Plan, before: Dict[str, int], resumed: int, seconds: float, run: Dict[str, Any],
           **summary_fields: Any) -> ExtractSummary:
    """Record the run (``run``: engine-specific figures) in ``meta.json``; return its summary."""
    store = plan.store
    after = store.counts()
    summary = ExtractSummary(
        out_dir=store.out, inputs=len(store.paths), images=after["rows"], skipped=after["skipped"],
        new_images=after["rows"] - before["rows"], new_skipped=after["skipped"] - before["skipped"],
        resumed_batches=resumed, seconds=seconds, complete=store.complete, **summary_fields,
    )
    store.finish({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": summary.engine,
                  "resumed_batches": resumed, "images": summary.new_images, "skipped": summary.new_skipped,
                  "seconds": round(seconds, 3), "rate": round(summary.rate, 3), **run})
    return summary


# -- shared by the engines' loops ------------------------------------------------------------------
def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar in images (with images/s) on stderr, or ``None`` (disabled, or tqdm missing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        _logger.warning("no progress bar: tqdm is not installed (pip install 'featurezoo[cli]')")
        return None
    return tqdm(total=total, initial=initial, unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """Torch's thread count set to ``n`` within the block (unchanged when ``n`` is falsy)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pool_features(feats: Sequence[torch.Tensor], pool: str) -> List[torch.Tensor]:
    if pool == "avg":
        return [f.mean(dim=(2, 3)) for f in feats]
    if pool == "max":
        return [f.amax(dim=(2, 3)) for f in feats]
    return list(feats)
