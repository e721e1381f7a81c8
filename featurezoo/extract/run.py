"""The extraction run: :func:`extract_features`, and its local engine.

``extract_features(..., engine="local")`` (the default) runs on this machine:
images are decoded (:mod:`.data`) in DataLoader workers while the model
runs, or, where decoding is cheap next to the model and cores are few, in
this process, which is faster there (:func:`choose_workers`). Shards are
written by a background thread (:mod:`.store`). ``engine="ray"`` hands the
same plan to :mod:`.ray_engine`. The checks, the settings, the output
directory and the summary are the engines' shared :mod:`.plan`. See
``benchmarks/bench_extract.py``.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..inference import InferenceModel
from . import ray_engine
from .data import ExtractError, ImageBatches, PathLike
from .plan import (ExtractSummary, OutIndices, Plan, already_complete, build_feature_model, check_arguments,
                   finish, list_inputs, num_threads, pool_features, prepare, progress_bar, resolve_device,
                   versions, warn_random_init)
from .store import FeatureStore

__all__ = ["extract_features", "choose_workers", "default_workers", "ENGINES"]

_logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


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
    engine: str = "local",
    ray_address: Optional[str] = None,
    model_workers: Optional[int] = None,
    cpus_per_worker: Optional[float] = None,
    gpus_per_worker: Optional[float] = None,
    eager: bool = False,
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
            Local engine only.
        dtype: model and stored dtype.
        eager: run the eager model instead of the inference path (recorded as ``path`` in meta.json's
            run; resuming with the other path is allowed, float32 outputs agree within 1e-5 of max).
        checkpoint_path / pretrained: the weights; with neither the model is
            randomly initialised (seed :data:`RANDOM_INIT_SEED`) and a warning is logged.
        size: ``(H, W)`` of the model input; default the model's cfg.
        jpeg_draft: let JPEGs decode at a reduced scale when they are at least
            twice the size needed (faster, very slightly different pixels).
        threads: torch threads for the model during the run (default: unchanged;
            on a Ray cluster: each model worker's, default ``cpus_per_worker``).
        progress: show a progress bar (images/s) on stderr (needs tqdm).
        engine: ``"local"`` (this machine) or ``"ray"`` (a Ray cluster through Ray Data,
            :mod:`featurezoo.extract.ray_engine`; needs ``featurezoo[ray]``). Both
            write the same directory, and either resumes the other's run.
        ray_address / model_workers / cpus_per_worker / gpus_per_worker: the Ray
            engine's; see :func:`featurezoo.extract.ray_engine.extract_on_ray`.

    Decoding needs Pillow: without it, :class:`~featurezoo._optional.MissingDependency`
    (a ``ModuleNotFoundError``) says which extra to install, before anything is written.
    """
    common = dict(out_indices=out_indices, pool=pool, batch_size=batch_size, dtype=dtype,
                  checkpoint_path=checkpoint_path, pretrained=pretrained, size=size, jpeg_draft=jpeg_draft)
    if engine == "ray":
        if eager:
            raise ExtractError("eager is for the local engine; the Ray engine's model workers run the inference "
                               "path (float32 features within 1e-5 of the eager model's largest value)")
        if workers is not None:
            raise ExtractError("workers (decoding processes) is for the local engine; with engine 'ray' images "
                               "are decoded by Ray tasks on the cluster's CPUs")
        return ray_engine.extract_on_ray(model_name, inputs, out_dir, device=device, overwrite=overwrite,
                                         threads=threads, progress=progress, address=ray_address,
                                         model_workers=model_workers, cpus_per_worker=cpus_per_worker,
                                         gpus_per_worker=gpus_per_worker, **common)
    if engine != "local":
        raise ExtractError(f"engine {engine!r} is not valid; use one of {', '.join(ENGINES)}")
    ray_options = dict(ray_address=ray_address, model_workers=model_workers, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker)
    given = [f"{k} (--{k.replace('_', '-')})" for k, v in ray_options.items() if v is not None]
    if given:
        raise ExtractError(f"{', '.join(given)} only apply to engine 'ray' (--engine ray); this run's engine is "
                           f"'local'")
    if workers is not None and workers < 0:
        raise ExtractError(f"workers must be >= 0, got {workers}")
    job = check_arguments(model_name, inputs, out_dir, device=resolve_device(device), **common)
    plan = prepare(job, list_inputs(job), overwrite)
    done_already = already_complete(plan, "local")
    if done_already is not None:
        return done_already
    warn_random_init(job)
    model = build_feature_model(model_name, job.indices, checkpoint_path, pretrained, job.preprocess.size,
                                eager=eager)
    model.to(device=job.device, dtype=job.dtype)

    done = plan.store.begin(overwrite=overwrite, versions=versions(), engine="local")
    try:
        return _run(model, plan, done, workers, threads, progress)
    finally:
        plan.store.close()


def _run(model: nn.Module, plan: Plan, done: int, workers: Optional[int], threads: Optional[int],
         progress: bool) -> ExtractSummary:
    store, job = plan.store, plan.job
    preprocess, dev, dtype = job.preprocess, job.device, job.dtype
    dataset = ImageBatches(store.paths, store.batch_size, preprocess)
    pending = list(range(done, len(dataset)))
    before = store.counts()
    threads = threads or None
    if done:
        _logger.info("%s: resuming, %d of %d batches already done", store.out, done, len(dataset))
    names = plan.level_keys
    bar = progress_bar(len(store.paths), before["rows"] + before["skipped"], progress)
    t0 = time.perf_counter()
    writer = _Writer(store)
    n_skipped = before["skipped"]

    def compute(k: int, batch: torch.Tensor, rows: List[int], skipped: List[Tuple[int, str]]) -> None:
        nonlocal n_skipped
        outs: Dict[str, torch.Tensor] = {}
        if rows:
            x = preprocess.normalize(batch.to(dev, non_blocking=True), dtype)
            feats = pool_features(model(x), job.pool)
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
        with num_threads(threads), torch.inference_mode():
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
    return finish(plan, before, done, seconds,
                  {"workers": n_workers, "workers_auto": auto,
                   "decode_model_ratio": None if ratio is None else round(ratio, 4),
                   "threads": threads or torch.get_num_threads(), "device": str(dev),
                   "path": "inference" if isinstance(model, InferenceModel) else "eager"},
                  workers=n_workers)
