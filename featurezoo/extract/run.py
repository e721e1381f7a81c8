"""The extraction run: :func:`extract_features` and the checks before it.

Everything that can be wrong with the arguments (model, indices, dtype,
device, checkpoint, inputs, output directory) is checked before anything is
written. Images are decoded (:mod:`.data`) in DataLoader workers while the
model runs, or, where decoding is cheap next to the model and cores are few,
in this process, which is faster there (:func:`choose_workers`).
Shards are written by a background thread (:mod:`.store`). See
``benchmarks/bench_extract.py``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import safetensors
import torch
import torch.nn as nn

from .. import __version__
from .._optional import require
from ..checkpoint import load_checkpoint
from ..discovery import import_factory, is_factory_path, wrap
from ..factory import create_model
from ..registry import build_on_meta
from .data import ExtractError, ImageBatches, PathLike, Preprocess, collect_inputs, looks_like_images, pillow
from .store import FeatureStore, inputs_digest

__all__ = ["extract_features", "ExtractSummary", "build_feature_model", "probe_model", "weights_setting",
           "choose_workers", "resolve_dtype", "resolve_device", "pool_features", "versions", "POOLS", "DTYPES",
           "RANDOM_INIT_SEED", "OutIndices"]

_logger = logging.getLogger(__name__)

POOLS = ("none", "avg", "max")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Without weights (no checkpoint, not pretrained) a model is initialised from this seed, so that a
# resumed run computes the same features as the run it continues.
RANDOM_INIT_SEED = 0

OutIndices = Union[Sequence[int], str, None]


@dataclass
class ExtractSummary:
    """What one call of :func:`extract_features` did."""

    out_dir: Path
    inputs: int  # input files, images or not
    images: int  # rows in OUT now
    skipped: int  # inputs listed as skipped in OUT now
    new_images: int  # rows written by this call
    new_skipped: int
    resumed_batches: int  # batches found done when this call started
    seconds: float  # the extraction loop (after the model was built)
    complete: bool
    workers: int = 0  # decoding processes used

    @property
    def rate(self) -> float:
        return (self.new_images + self.new_skipped) / self.seconds if self.seconds > 0 else 0.0


# -- argument checks ------------------------------------------------------------------------------
def resolve_dtype(dtype: Union[str, torch.dtype]) -> Tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ExtractError(f"dtype {dtype} is not supported; valid: {', '.join(DTYPES)}")
        return names[dtype], dtype
    if dtype not in DTYPES:
        raise ExtractError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
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
                        pretrained: bool = False, size: Optional[Tuple[int, int]] = None) -> nn.Module:
    """The feature model, in eval mode, with the weights :func:`extract_features` would use.

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
        return wrap(model, out_indices, _discovery_size(size), model_name=model_name).eval()
    kwargs = dict(features_only=True, out_indices=out_indices)
    if checkpoint_path:
        model = create_model(model_name, checkpoint_path=os.fspath(checkpoint_path), **kwargs)
    elif pretrained:
        model = create_model(model_name, pretrained=True, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = create_model(model_name, **kwargs)
    return model.eval()


def versions() -> Dict[str, str]:
    """The versions that made a run, as recorded in ``meta.json``."""
    PIL = require("PIL", "cli", "featurezoo.extract")
    return {"featurezoo": __version__, "torch": torch.__version__, "pillow": PIL.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """One decoding process per spare core (at least one), at most 8."""
    return max(1, min(8, available_cores() - 1))


# workers=None ("auto"): the first batches are decoded in this process and timed against the model.
AUTO_PROBE_BATCHES = 2
AUTO_MIN_DECODE_SHARE = 0.25
AUTO_MAX_WORKERS = 16


def choose_workers(decode_per_model: float, device: torch.device, cores: Optional[int] = None) -> int:
    """Decoding processes for a run whose decoding takes ``decode_per_model`` times the model's time.

    On a CPU, decoding processes take cores from the model's threads and slow
    it by about as much as they save when decoding is cheap: on 2 cores (an
    H200 host pinned with taskset, ``benchmarks/bench_extract.py``), resnet50 at
    224 px extracted at 0.97 / 0.90 of its model-only rate decoding in-process
    and 0.85 / 0.91 with one worker (two sessions); mobilenet_v3_small_100,
    where decoding dominates, at 0.41 / 0.52 in-process and 0.47 / 0.57 with
    two workers. So decode in-process while decoding costs less than
    :data:`AUTO_MIN_DECODE_SHARE` of the model's time; else run 1.5x the
    workers that would just keep up (a worker sharing cores decodes slower than
    the timing in this process), one per core at most (on a GPU, per spare core).
    """
    cores = cores or available_cores()
    if device.type == "cpu" and decode_per_model < AUTO_MIN_DECODE_SHARE:
        return 0
    cap = cores if device.type == "cpu" else cores - 1
    return max(1, min(cap, AUTO_MAX_WORKERS, math.ceil(1.5 * decode_per_model)))


# -- the run ---------------------------------------------------------------------------------------
class _Writer:
    """Writes shards on a background thread, in order, so that disk I/O overlaps compute."""

    def __init__(self, store: FeatureStore, depth: int = 2):
        self.store = store
        self.queue: "queue.Queue[Optional[tuple]]" = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="featurezoo-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write_batch(*item)
                except BaseException as e:  # handed to the main thread, which raises it
                    self.error = e

    def put(self, *item: Any) -> None:
        self._raise()
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def _progress_bar(total: int, initial: int, enabled: bool):
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
def _num_threads(n: Optional[int]):
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


def extract_features(
    model_name: str,
    inputs: Iterable[PathLike],
    out_dir: PathLike,
    *,
    out_indices: OutIndices = None,
    pool: str = "none",
    batch_size: int = 32,
    workers: Optional[int] = None,
    dtype: Union[str, torch.dtype] = "float32",
    device: Union[str, torch.device] = "cpu",
    checkpoint_path: PathLike = "",
    pretrained: bool = False,
    size: Optional[Tuple[int, int]] = None,
    jpeg_draft: bool = True,
    overwrite: bool = False,
    threads: Optional[int] = None,
    progress: bool = False,
) -> ExtractSummary:
    """Run ``model_name``'s feature model over ``inputs`` and store the features in ``out_dir``.

    Args:
        inputs: image files, folders (recursive) and text files of paths; see
            :func:`featurezoo.extract.data.collect_inputs`. Sorted, so batch
            ``k`` always holds the same images.
        out_dir: created if needed. If it holds a run with the same settings,
            that run is resumed (done batches are kept); different settings
            raise :class:`ExtractError` naming the difference, unless
            ``overwrite``, which deletes the old features first.
        out_indices: as for ``create_model``: ints, ``None`` (all) or ``"pyramid"``.
        pool: ``"none"`` stores ``(C, H, W)`` maps, ``"avg"``/``"max"`` store ``(C,)`` vectors.
        workers: decoding processes; 0 decodes in this process; ``None`` (auto) times the
            first batches decoded in this process against the model and picks with
            :func:`choose_workers` (in-process when decoding is cheap next to the model).
        dtype: model and stored dtype.
        checkpoint_path / pretrained: the weights; with neither the model is
            randomly initialised (seed :data:`RANDOM_INIT_SEED`) and a warning is logged.
        size: ``(H, W)`` of the model input; default the model's cfg.
        jpeg_draft: let JPEGs decode at a reduced scale when they are at least
            twice the size needed (faster, very slightly different pixels).
        threads: torch threads for the model during the run (default: unchanged).
        progress: show a progress bar (images/s) on stderr (needs tqdm).

    Decoding needs Pillow: without it, :class:`~featurezoo._optional.MissingDependency`
    (a ``ModuleNotFoundError``) says which extra to install, before anything is written.
    """
    pillow()
    if pool not in POOLS:
        raise ExtractError(f"pool {pool!r} is not valid; use one of {', '.join(POOLS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractError(f"batch size must be a positive integer, got {batch_size!r}")
    if workers is not None and workers < 0:
        raise ExtractError(f"workers must be >= 0, got {workers}")
    dtype_name, torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    info, indices, cfg, shapes = probe_model(model_name, out_indices, size)
    preprocess = Preprocess.from_cfg(cfg, size, jpeg_draft=jpeg_draft)
    weights = weights_setting(checkpoint_path, pretrained)
    if weights["source"] == "pretrained":
        if not cfg.url:
            raise ExtractError(f"{model_name} has no published weights; pass --checkpoint instead")
        weights["url"] = cfg.url

    out_abs = os.path.abspath(os.fspath(out_dir))
    given = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not given:
        raise ExtractError("no inputs given")
    paths = collect_inputs(given, exclude=[out_abs])
    where = ", ".join(os.fspath(g) for g in given[:3]) + (", ..." if len(given) > 3 else "")
    if not paths:
        raise ExtractError(f"no images found in {where}")
    if not looks_like_images(paths):
        raise ExtractError(f"no images found in {where} ({len(paths)} file(s), none of them an image)")

    names = [entry["name"] for entry in info]
    levels = []
    for idx, entry, shape in zip(indices, info, shapes):
        stored = shape if pool == "none" else shape[:1]
        # the tensor's name in the shards: the module's, unless two levels share a module
        key = entry["name"] if names.count(entry["name"]) == 1 else f"{idx}:{entry['name']}"
        levels.append({"index": idx, "name": entry["name"], "key": key, "chs": entry["chs"],
                       "reduction": entry["reduction"], "shape": list(stored)})
    settings = {
        "model": model_name,
        "weights": weights,
        "out_indices": indices,
        "pool": pool,
        "dtype": dtype_name,
        "device": dev.type,
        "size": list(preprocess.size),
        "preprocessing": preprocess.to_dict(),
        "batch_size": batch_size,
        "inputs": {"count": len(paths), "sha256": inputs_digest(paths)},
        "levels": levels,
    }
    store = FeatureStore.open(out_abs, settings, paths, batch_size, overwrite=overwrite)
    if store.complete and not overwrite:
        counts = store.counts()
        _logger.info("%s: already complete (%d rows), nothing to do", store.out, counts["rows"])
        return ExtractSummary(store.out, len(paths), counts["rows"], counts["skipped"], 0, 0,
                              store.state.done_batches, 0.0, True)

    if weights["source"] == "random-init":
        _logger.warning("%s: no weights given (checkpoint or pretrained); features come from a randomly "
                        "initialised model (seed %d)", model_name, RANDOM_INIT_SEED)
    model = build_feature_model(model_name, indices, checkpoint_path, pretrained, size)
    model.to(device=dev, dtype=torch_dtype)

    done = store.begin(overwrite=overwrite, versions=versions())
    try:
        return _run(model, store, preprocess, levels, pool, torch_dtype, dev, done, workers, threads, progress)
    finally:
        store.close()


def _run(model: nn.Module, store: FeatureStore, preprocess: Preprocess, levels: List[Dict[str, Any]], pool: str,
         dtype: torch.dtype, dev: torch.device, done: int, workers: Optional[int], threads: Optional[int],
         progress: bool) -> ExtractSummary:
    dataset = ImageBatches(store.paths, store.batch_size, preprocess)
    pending = list(range(done, len(dataset)))
    before = store.counts()
    threads = threads or None
    if done:
        _logger.info("%s: resuming, %d of %d batches already done", store.out, done, len(dataset))
    names = [lv["key"] for lv in levels]
    bar = _progress_bar(len(store.paths), before["rows"] + before["skipped"], progress)
    t0 = time.perf_counter()
    writer = _Writer(store)
    n_skipped = before["skipped"]

    def compute(k: int, batch: torch.Tensor, rows: List[int], skipped: List[Tuple[int, str]]) -> None:
        nonlocal n_skipped
        outs: Dict[str, torch.Tensor] = {}
        if rows:
            x = preprocess.normalize(batch.to(dev, non_blocking=True), dtype)
            feats = pool_features(model(x), pool)
            outs = {name: f.to("cpu") for name, f in zip(names, feats)}
        for pos, reason in skipped:
            _logger.info("skipped %s: %s", store.paths[pos], reason)
        writer.put(k, outs, rows, skipped)
        n_skipped += len(skipped)
        if bar is not None:
            if skipped:
                bar.set_postfix(skipped=n_skipped, refresh=False)
            bar.update(len(rows) + len(skipped))

    auto = workers is None
    n_workers, ratio = (0 if auto else workers), None
    try:
        with _num_threads(threads), torch.inference_mode():
            if auto:  # time the first batches in this process, then choose
                probe, pending = pending[:AUTO_PROBE_BATCHES], pending[AUTO_PROBE_BATCHES:]
                for k in probe:
                    t_start = time.perf_counter()
                    item = dataset[k]
                    t_decoded = time.perf_counter()
                    compute(*item)
                    if item[2]:  # the last probe batch with images: after the first, warm-up is over
                        ratio = (t_decoded - t_start) / max(time.perf_counter() - t_decoded, 1e-9)
                if pending:
                    n_workers = default_workers() if ratio is None else choose_workers(ratio, dev)
                    _logger.info("decoding takes %s the model's time: %d decoding worker(s)",
                                 "?" if ratio is None else f"{ratio:.2f}x", n_workers)
            n_workers = min(n_workers, len(pending))
            if pending:
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=None, sampler=pending, num_workers=n_workers,
                    pin_memory=dev.type == "cuda", prefetch_factor=4 if n_workers else None,
                )
                for item in loader:
                    compute(*item)
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - t0
    after = store.counts()
    summary = ExtractSummary(
        out_dir=store.out, inputs=len(store.paths), images=after["rows"], skipped=after["skipped"],
        new_images=after["rows"] - before["rows"], new_skipped=after["skipped"] - before["skipped"],
        resumed_batches=done, seconds=seconds, complete=store.state.done_batches == len(dataset),
        workers=n_workers,
    )
    store.finish({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_batches": done,
                  "images": summary.new_images, "skipped": summary.new_skipped, "seconds": round(seconds, 3),
                  "rate": round(summary.rate, 3), "workers": n_workers, "workers_auto": auto,
                  "decode_model_ratio": None if ratio is None else round(ratio, 4),
                  "threads": threads or torch.get_num_threads(), "device": str(dev)})
    return summary
