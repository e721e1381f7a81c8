"""The extraction run: :func:`extract_features`, and its local engine.

``extract_features(..., engine="local")`` (the default) runs on this machine
as a bounded pipeline of three stages that overlap: images are decoded
(:mod:`.data`) on threads of this process (or in DataLoader worker
processes); the model runs on the main thread (or in two lanes); a writer
thread casts (``store_dtype``) and writes the shards (:mod:`.store`). How
decoding runs is chosen from the first batches' timings
(:func:`choose_decoding`): on a CPU, in two lanes that each decode a batch
and then run the model on it (so one lane's decoding overlaps the other's
model), or where decoding costs a quarter of the model's time or more,
phased (each batch on every core, then the model). ``engine="ray"`` hands the
same plan to :mod:`.ray_engine`. The checks, the settings, the output
directory and the summary are the engines' shared :mod:`.plan`. See
``benchmarks/bench_extract.py``.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..inference import InferenceModel
from . import ray_engine
from .data import ExtractError, ImageBatches, PathLike
from .plan import (ExtractSummary, OutIndices, Plan, already_complete, build_feature_model, check_arguments,
                   finish, list_inputs, num_threads, pool_features, prepare, progress_bar, resolve_device,
                   versions, warn_random_init)
from .store import FeatureStore

__all__ = ["extract_features", "choose_workers", "choose_decoding", "Decoding", "default_workers", "ENGINES"]

_logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """One decoding process per spare core (at least one), at most 8."""
    return max(1, min(8, available_cores() - 1))


# workers=None ("auto"): the first batches are decoded in this process (on every core, while the model waits)
# and timed against the model.
AUTO_PROBE_BATCHES = 2
AUTO_MIN_DECODE_SHARE = 0.25
AUTO_MAX_WORKERS = 16
LANES = 2  # lanes of a CPU run whose decoding is cheap (see choose_decoding)


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


class Decoding(NamedTuple):
    """How a run decodes: processes, or (with none) threads in this process; and the model's torch threads."""

    workers: int  # decoding processes (DataLoader workers)
    threads: int  # decoding threads in this process, when workers is 0 (0: between batches, on the model's thread)
    model_threads: Optional[int]  # torch threads for the model (in each lane, with lanes); None: unchanged
    phased: bool = False  # the threads decode each batch's images together while the model waits, then the model runs
    lanes: int = 0  # threads that each decode a batch, then run the model on it (0: none; the model runs here)


def choose_decoding(decode_per_model: float, device: torch.device, cores: Optional[int] = None,
                    model_threads: Optional[int] = None) -> Decoding:
    """The decoding of a run whose decoding takes ``decode_per_model`` times the model's time (``workers=None``).

    On a GPU, decoding processes as :func:`choose_workers` says (the model
    leaves the cores to them). On a CPU, decoding runs on threads of this
    process (Pillow's decoder and resampler release the GIL; no process
    start-up, pickling or copies), and never beside the model's parallel
    regions: a model thread that loses its core to a decoding thread stalls
    the region (each waits for its slowest thread), so the model slows by more
    than the decoding costs.

    * cheap decoding (under :data:`AUTO_MIN_DECODE_SHARE` of the model's time):
      two lanes, each decoding a batch and then running the model on it with
      half the threads; one lane's decoding overlaps the other's model. On 2
      cores resnet50 unpooled (decoding ~0.05 of the model's time) extracted at
      1.03-1.10x the images/s of one decoding thread beside the model's 2 in
      three runs alternating the two (``benchmarks/bench_extract.py --workers
      auto 0:1``), and at 0.94-1.04 of the model alone (README);
    * costly decoding: phased: one thread per core decodes each batch's images
      together, then the model runs on its threads. On 2 cores
      mobilenet_v3_small_100 (decoding 2-3x the model's time) extracted at
      201.8 img/s with 1 decoding thread beside the model's 2, 231.1 with 2,
      and 288.5 phased; lanes were no faster than phased.

    One core, or cheap decoding and a model asked to run on one thread: one
    decoding thread beside the model. ``model_threads`` (the run's torch
    threads) is split between the lanes.
    """
    cores = cores or available_cores()
    if device.type != "cpu":
        return Decoding(choose_workers(decode_per_model, device, cores), 0, None)
    threads = model_threads or cores
    if cores < 2 or (decode_per_model < AUTO_MIN_DECODE_SHARE and threads < LANES):
        return Decoding(0, 1, None)
    if decode_per_model < AUTO_MIN_DECODE_SHARE:
        return Decoding(0, 0, threads // LANES, lanes=LANES)
    return Decoding(0, min(cores, AUTO_MAX_WORKERS), None, phased=True)


# -- the run ---------------------------------------------------------------------------------------
class _Writer:
    """Writes shards on a background thread, in order, so that disk I/O overlaps compute.

    Tensors are cast to ``store_dtype`` here, off the model's thread (torch
    releases the GIL for the copy). ``waited`` is the time the model's thread
    spent blocked on a full queue: the run was writer-bound for that long.
    """

    def __init__(self, store: FeatureStore, depth: int = 2, store_dtype: Optional[torch.dtype] = None):
        self.store = store
        self.store_dtype = store_dtype
        self.queue: "queue.Queue[Optional[tuple]]" = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.waited = 0.0
        self.thread = threading.Thread(target=self._run, name="featurezoo-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    k, tensors, rows, skipped = item
                    if self.store_dtype is not None:
                        tensors = {name: t.to(self.store_dtype) for name, t in tensors.items()}
                    self.store.write_batch(k, tensors, rows, skipped)
                except BaseException as e:  # handed to the main thread, which raises it
                    self.error = e

    def put(self, *item: Any) -> None:
        self._raise()
        t0 = time.perf_counter()
        self.queue.put(item)
        self.waited += time.perf_counter() - t0

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class _TimedThreads(ThreadPoolExecutor):
    """Threads that add up how long their tasks took (``busy``, seconds): the probe batches are decoded on every
    core while the model waits, and ``busy`` is what decoding them on one thread would have taken."""

    def __init__(self, threads: int):
        super().__init__(max_workers=threads, thread_name_prefix="featurezoo-probe")
        self.busy = 0.0
        self._lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        def timed():
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.busy += time.perf_counter() - t0
        return super().submit(timed)


@contextlib.contextmanager
def _threaded(dataset: ImageBatches, ks: Sequence[int], threads: int, depth: int) -> Iterator[Iterator[tuple]]:
    """Batches ``ks`` of ``dataset``, in order, decoded on ``threads`` background threads at most ``depth`` ahead.

    Pillow's decoder and resampler, and numpy's copies, release the GIL, so the
    decoding overlaps the model's forward (torch releases it too) without the
    worker processes' start-up, pickling and extra memory. On leaving the block
    the batches not yet started are cancelled and the running ones finished.
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featurezoo-decode")
    futures: "collections.deque[Future]" = collections.deque()
    todo = iter(ks)

    def fill() -> None:
        while len(futures) < depth:
            k = next(todo, None)
            if k is None:
                return
            futures.append(pool.submit(dataset.__getitem__, k))

    def items() -> Iterator[tuple]:
        fill()
        while futures:
            item = futures.popleft().result()
            fill()
            yield item

    try:
        yield items()
    finally:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)


class _Lanes:
    """Batches ``ks`` on ``lanes`` threads (the calling one among them): each lane decodes a batch on its own
    thread, then runs ``step(batch, rows)`` on it (the model, with the torch threads set by the caller);
    ``emit(k, outs, rows, skipped)`` gets the results in batch order, called by whichever lane completes the
    next one, under the lanes' lock (so a full writer queue holds every lane back).

    A lane takes a batch only while fewer than ``2 * lanes`` taken batches wait to be emitted, so at most that
    many results are held. The first error (or an interrupt of the calling thread) stops every lane after its
    current batch; it is raised once they have all stopped, and nothing after the last emitted batch is emitted.
    ``decode_s`` is the decoding time summed over the lanes.
    """

    def __init__(self, dataset: ImageBatches, ks: Sequence[int], lanes: int, step, emit):
        self.dataset, self.ks, self.lanes, self.step, self.emit = dataset, list(ks), lanes, step, emit
        self.cond = threading.Condition()
        self.taken = 0  # positions in ks handed to a lane
        self.emitted = 0  # positions in ks emitted
        self.ready: Dict[int, tuple] = {}
        self.error: Optional[BaseException] = None
        self.decode_s = 0.0

    def run(self) -> None:
        threads = [threading.Thread(target=self._lane, name=f"featurezoo-lane-{i}", daemon=True)
                   for i in range(1, self.lanes)]
        for t in threads:
            t.start()
        try:
            self._lane()
        finally:  # on an error or an interrupt here, the other lanes stop after their current batch
            for t in threads:
                t.join()
        if self.error is not None:
            raise self.error

    def _take(self) -> Optional[int]:
        with self.cond:
            while self.error is None and self.taken < len(self.ks) and self.taken - self.emitted >= 2 * self.lanes:
                self.cond.wait()
            if self.error is not None or self.taken >= len(self.ks):
                return None
            self.taken += 1
            return self.taken - 1

    def _lane(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    pos = self._take()
                    if pos is None:
                        return
                    t0 = time.perf_counter()
                    k, batch, rows, skipped = self.dataset[self.ks[pos]]
                    t1 = time.perf_counter()
                    result = (k, self.step(batch, rows), rows, skipped)
                    with self.cond:
                        self.decode_s += t1 - t0
                        self.ready[pos] = result
                        while self.error is None and self.emitted in self.ready:
                            self.emit(*self.ready.pop(self.emitted))
                            self.emitted += 1
                        self.cond.notify_all()
        except BaseException as e:
            with self.cond:
                if self.error is None:
                    self.error = e
                self.cond.notify_all()
            if threading.current_thread() is threading.main_thread():
                raise


def extract_features(
    model_name: str,
    inputs: Iterable[PathLike],
    out_dir: PathLike,
    *,
    out_indices: OutIndices = None,
    pool: str = "none",
    batch_size: int = 32,
    workers: Optional[int] = None,
    decode_threads: Optional[int] = None,
    dtype: Union[str, torch.dtype] = "float32",
    store_dtype: Union[str, torch.dtype, None] = None,
    layout: Optional[str] = None,
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
        workers: decoding processes; 0 decodes in this process, on ``decode_threads``
            threads; ``None`` (auto) times the first batches decoded in this process (on every core)
            against the model and picks with :func:`choose_decoding` (on a CPU: two
            lanes that each decode a batch and run the model on it with half the
            threads, or phased: each batch decoded on every core, then the model).
            Local engine only.
        decode_threads: with no decoding processes, the threads that decode in this
            process while the model runs (default: 1, or with ``workers=None`` as
            :func:`choose_decoding` says); 0 decodes on the model's thread, between
            batches. Local engine only.
        dtype: the model's dtype, and the stored one unless ``store_dtype``.
        store_dtype: the stored features' dtype (default ``dtype``): ``"float16"``
            halves what a float32 model writes (values beyond float16's 65504 become
            inf). Recorded in ``meta.json``; :func:`~featurezoo.extract.load_features`
            returns this dtype.
        layout: how unpooled maps are stored in the shards: ``"nhwc"`` (``(N, H, W, C)``;
            the default of a new run: the inference path's channels-last maps are written
            without a transpose) or ``"nchw"``. ``None``: a resumed run's layout, else
            ``"nhwc"``. :func:`~featurezoo.extract.load_features` returns ``(N, C, H, W)``
            either way. Not for pooled features.
        eager: run the eager model instead of the inference path (recorded as ``path`` in meta.json's
            run; resuming with the other path is allowed, float32 outputs agree within 1e-5 of max).
        checkpoint_path / pretrained: the weights; with neither the model is
            randomly initialised (seed :data:`RANDOM_INIT_SEED`) and a warning is logged.
        size: ``(H, W)`` of the model input; default the model's cfg.
        jpeg_draft: let JPEGs decode at a reduced scale when they are at least
            twice the size needed (faster, very slightly different pixels).
        threads: torch threads for the model during the run (default: unchanged; with
            ``workers=None`` on a CPU, split between the two lanes when it runs them;
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
                  checkpoint_path=checkpoint_path, pretrained=pretrained, size=size, jpeg_draft=jpeg_draft,
                  store_dtype=store_dtype, layout=layout)
    if engine == "ray":
        if eager:
            raise ExtractError("eager is for the local engine; the Ray engine's model workers run the inference "
                               "path (float32 features within 1e-5 of the eager model's largest value)")
        if workers is not None or decode_threads is not None:
            raise ExtractError("workers and decode_threads (decoding processes, threads) are for the local engine; "
                               "with engine 'ray' images are decoded by Ray tasks on the cluster's CPUs")
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
    for what, value in (("workers", workers), ("decode_threads", decode_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ExtractError(f"{what} must be an integer >= 0 (or None: automatic), got {value!r}")
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
        return _run(model, plan, done, workers, threads, progress, decode_threads)
    finally:
        plan.store.close()


def _run(model: nn.Module, plan: Plan, done: int, workers: Optional[int], threads: Optional[int],
         progress: bool, decode_threads: Optional[int] = None) -> ExtractSummary:
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
    writer = _Writer(store, store_dtype=None if job.store_dtype == job.dtype else job.store_dtype)
    n_skipped = before["skipped"]
    busy = {"model": 0.0, "input_wait": 0.0}
    busy_lock = threading.Lock()  # lanes add to busy from their threads

    def step(batch: torch.Tensor, rows: List[int]) -> Dict[str, torch.Tensor]:
        t_start = time.perf_counter()
        outs: Dict[str, torch.Tensor] = {}
        if rows:
            x = preprocess.normalize(batch.to(dev, non_blocking=True), dtype)
            feats = pool_features(model(x), job.pool)
            outs = {name: f.to("cpu") for name, f in zip(names, feats)}
        with busy_lock:
            busy["model"] += time.perf_counter() - t_start
        return outs

    def compute(k: int, batch: torch.Tensor, rows: List[int], skipped: List[Tuple[int, str]]) -> None:
        emit(k, step(batch, rows), rows, skipped)

    def emit(k: int, outs: Dict[str, torch.Tensor], rows: List[int], skipped: List[Tuple[int, str]]) -> None:
        nonlocal n_skipped
        for pos, reason in skipped:
            _logger.info("skipped %s: %s", store.paths[pos], reason)
        writer.put(k, outs, rows, skipped)
        n_skipped += len(skipped)
        if bar is not None:
            if skipped:
                bar.set_postfix(skipped=n_skipped, refresh=False)
            bar.update(len(rows) + len(skipped))

    def consume(items: Iterable[tuple]) -> None:
        it = iter(items)
        while True:
            t_wait = time.perf_counter()
            item = next(it, None)
            busy["input_wait"] += time.perf_counter() - t_wait
            if item is None:
                return
            compute(*item)

    auto = workers is None
    choice = Decoding(workers or 0, 1 if decode_threads is None else decode_threads, None)
    ratio = None
    try:
        with num_threads(threads), torch.inference_mode():
            if auto:  # time the first batches in this process, then choose
                probe, pending = pending[:AUTO_PROBE_BATCHES], pending[AUTO_PROBE_BATCHES:]
                with _TimedThreads(available_cores()) as pool:
                    for k in probe:
                        pool.busy = 0.0
                        item = dataset.decode(k, pool)
                        t_decoded = time.perf_counter()
                        compute(*item)
                        if item[2]:  # the last probe batch with images: after the first, warm-up is over
                            ratio = pool.busy / max(time.perf_counter() - t_decoded, 1e-9)
                if pending:
                    choice = Decoding(default_workers(), 0, None) if ratio is None else \
                        choose_decoding(ratio, dev, model_threads=torch.get_num_threads())
                    if decode_threads is not None and not choice.workers:  # threads beside the model, as asked
                        choice = Decoding(0, decode_threads, None)
                    _logger.info("decoding takes %s the model's time: %d decoding process(es), %d thread(s)%s; "
                                 "model threads %s", "?" if ratio is None else f"{ratio:.2f}x", choice.workers,
                                 choice.threads, f", {choice.lanes} lanes" if choice.lanes else
                                 ", phased" if choice.phased else "", choice.model_threads or "unchanged")
            choice = choice._replace(workers=min(choice.workers, len(pending)))
            with num_threads(choice.model_threads):
                if pending and choice.lanes:
                    lanes = _Lanes(dataset, pending, choice.lanes, step, emit)
                    lanes.run()
                    busy["input_wait"] += lanes.decode_s
                elif pending and choice.phased:
                    with _TimedThreads(choice.threads) as pool:
                        consume(dataset.decode(k, pool) for k in pending)
                elif pending and choice.workers:
                    loader = torch.utils.data.DataLoader(
                        dataset, batch_size=None, sampler=pending, num_workers=choice.workers,
                        pin_memory=dev.type == "cuda", prefetch_factor=4,
                    )
                    consume(loader)
                elif pending and choice.threads:
                    with _threaded(dataset, pending, choice.threads, depth=choice.threads + 1) as items:
                        consume(items)
                elif pending:
                    consume(dataset[k] for k in pending)
                model_threads = torch.get_num_threads()
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - t0
    return finish(plan, before, done, seconds,
                  {"workers": choice.workers, "workers_auto": auto,
                   "decode_threads": 0 if choice.workers else choice.threads, "decode_phased": choice.phased,
                   "lanes": choice.lanes,
                   "decode_model_ratio": None if ratio is None else round(ratio, 4),
                   "threads": model_threads, "device": str(dev),
                   # where the time went: the model's thread computing, waiting for decoded batches, and
                   # blocked on the shard writer (the rest is the progress bar, logging and start-up); with
                   # lanes, the lanes' computing and decoding summed over them
                   "model_s": round(busy["model"], 3), "input_wait_s": round(busy["input_wait"], 3),
                   "write_wait_s": round(writer.waited, 3),
                   "path": "inference" if isinstance(model, InferenceModel) else "eager"},
                  workers=choice.workers)
