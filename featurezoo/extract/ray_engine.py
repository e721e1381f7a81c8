"""The Ray engine: ``extract_features(..., engine="ray")`` over a Ray cluster, through Ray Data.

The run is the local engine's (:mod:`.plan`: the same checks, settings,
output directory, skip reasons and resume rule); only where the work happens
changes. On the driver (the process that calls :func:`extract_on_ray`)::

    check the arguments                     nothing started yet
    connect to Ray (or start it)            an unreachable address fails here, in seconds
    list + sort the inputs                  Ray Data tasks, one per INPUT; the driver merges their runs
    open OUT, refuse other settings         the driver only
    range(pending batches)                  Ray Data
      -> decode batch k                     tasks, 1 CPU each, on any node: uint8 crops + skip reasons
      -> model workers                      an actor pool: each loads the model once, normalises,
                                            runs it, pools, and writes shard k into OUT (atomic rename)
    append the index in batch order         the driver, as batches finish (small records only)

So OUT must be a filesystem every node sees at the same path (a local path
on one machine, NFS or similar on a cluster), and so must the inputs.

Batch ``k`` is the same images as in the local engine, so the shards and the
index are the same files; rows equal the local engine's up to floating-point
differences of thread counts and devices. Ray Data retries a decode task, and
restarts a model worker that dies (its unfinished batches run again: a shard
is rewritten whole, under a temporary name). The driver indexes a batch only
once its shard is in place, in order; a batch that finishes early waits in a
small reorder buffer. If the driver dies, the index is still a prefix of
complete batches, and the same call resumes after it (shards past the prefix
are removed and recomputed).

Workers must import the same featurezoo as the driver: a local Ray instance
started here inherits this process's environment (``PYTHONPATH`` included);
nodes of an existing cluster need featurezoo installed, or ``PYTHONPATH``
set when ``ray start`` ran. A model worker built from another featurezoo
version refuses to start.

Ray is optional (``pip install 'featurezoo[ray]'``) and imported only here,
inside functions: ``import featurezoo`` never imports it.

Layer: application (the extraction library).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from types import ModuleType
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .. import __version__
from .._optional import require
from .data import ExtractError, PackedPaths, PathLike, Preprocess, batch_bounds, collect_inputs, decode_batch
from .plan import (ExtractSummary, Plan, already_complete, build_feature_model, check_arguments, finish,
                   list_inputs, pool_features, prepare, progress_bar, versions, warn_random_init)
from .store import write_shard

__all__ = ["extract_on_ray", "ray_session", "check_reachable", "default_model_workers", "list_inputs_on_ray",
           "FEATURE", "CONNECT_TIMEOUT_S", "MAX_BLOCKS", "DECODE_MEMORY"]

_logger = logging.getLogger(__name__)

FEATURE = "featurezoo extract --engine ray"
# An address that does not answer a TCP connection within this is reported as unreachable.
CONNECT_TIMEOUT_S = 5.0
# At most this many Ray Data blocks of batches: one batch per block (results stream back per batch) up to
# here; above, consecutive batches share a block, so the driver's per-block bookkeeping stays bounded.
MAX_BLOCKS = 4096
# Memory a decode task reserves beyond its batches' crops: its worker process (torch imported: about 370 MB RSS
# here) and one large photo being decoded (24 megapixels in RGB are 72 MB; Pillow's resize holds a second copy).
DECODE_MEMORY = 512 * 2**20


def _ray() -> ModuleType:
    require("ray.data", "ray", FEATURE, package="ray[data]")
    return require("ray", "ray", FEATURE, package="ray[data]")


# -- connecting --------------------------------------------------------------------------------------------
_HOST_PORT = re.compile(r"^(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d+)$")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`ExtractError` unless ``address`` (``HOST:PORT``, ``[IPv6]:PORT``) accepts a connection.

    Ray itself retries an address once a second for 20 s before it gives up;
    this answers in at most ``timeout`` seconds, before anything is written.
    """
    m = _HOST_PORT.match(address)
    if m is None:
        raise ExtractError(f"Ray address {address!r} is not valid; use auto or HOST:PORT (the head's GCS port)")
    host, port = m.group("ip6") or m.group("host"), int(m.group("port"))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise ExtractError(f"cannot reach the Ray cluster at {address}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise ExtractError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


@contextlib.contextmanager
def ray_session(address: Optional[str] = None) -> Iterator[ModuleType]:
    """Ray, connected for the block: to ``address`` (``"auto"``, ``HOST:PORT``), or to a local instance
    started for the block and shut down after it (``address=None``). If this process already joined Ray,
    that connection is used and left open."""
    ray = _ray()
    if ray.is_initialized():
        _logger.info("using this process's Ray connection (%s)", ray.get_runtime_context().gcs_address)
        yield ray
        return
    if address not in (None, "auto"):
        check_reachable(address)
    options: Dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:  # "auto" with no cluster running, a port that is not Ray's, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExtractError(f"cannot connect to the Ray cluster at {address}: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_data_context(ray: ModuleType) -> Iterator[Any]:
    """Ray Data's context for our datasets, restored after: no progress bars of its own (we show one),
    and its logging at WARNING (ERROR unless featurezoo logs INFO, as ``featurezoo -v`` does): it would
    otherwise report each dataset's plan, and that its progress bars are off."""
    ctx = ray.data.DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.execution_options.preserve_order)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    ctx.execution_options.preserve_order = False  # the driver reorders the (small) results itself
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING if _logger.isEnabledFor(logging.INFO) else logging.ERROR)
    try:
        yield ctx
    finally:
        data_logger.setLevel(level)
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.execution_options.preserve_order = before


# -- listing -------------------------------------------------------------------------------------------------
def _list_one(batch: Dict[str, np.ndarray], exclude: List[str]) -> Dict[str, np.ndarray]:
    """Ray Data task: the files of some INPUTs (``collect_inputs``' rules), as bytes; an error as a row."""
    paths: List[bytes] = []
    errors: List[str] = []
    for item in batch["input"]:
        try:
            found = collect_inputs([os.fsdecode(bytes(item))], exclude=exclude)
        except ExtractError as e:
            paths.append(b"")
            errors.append(str(e))
            continue
        paths.extend(os.fsencode(p) for p in found)
        errors.extend("" for _ in found)
    return {"path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object)}


def list_inputs_on_ray(given: List[PathLike], exclude: List[str]) -> List[str]:
    """What :func:`~featurezoo.extract.data.collect_inputs` returns, listed and sorted by Ray Data tasks.

    One task per INPUT (several folders or list files are listed in
    parallel, on the cluster's nodes), each sorting what it found; the driver
    then merges the sorted runs (``list.sort`` finds them: a k-way merge,
    linear for one INPUT) and drops duplicates. A global sort on the cluster
    would ship every path through a shuffle to end up on the driver anyway.
    """
    ray = _ray()
    items = [{"input": os.fsencode(os.fspath(g))} for g in given]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_list_one, batch_size=1, batch_format="numpy", fn_kwargs={"exclude": list(exclude)})
    paths: List[str] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for path, error in zip(batch.column("path").to_pylist(), batch.column("error").to_pylist()):
            if error:
                raise ExtractError(error)
            paths.append(os.fsdecode(path))
    paths.sort()
    return [p for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]


# -- decoding and the model ---------------------------------------------------------------------------------
def _decode(ids: Dict[str, np.ndarray], paths_ref: list, first: int, batch_size: int,
            preprocess: Preprocess) -> Dict[str, np.ndarray]:
    """Ray Data task: decode the batches ``first + id`` into uint8 crops (bytes) and their skip reasons."""
    paths = _ray().get(paths_ref[0])  # PackedPaths: two numpy buffers, read in place from the object store
    ks, images, skipped = [], [], []
    for i in ids["id"]:
        k = first + int(i)
        batch, _, skip = decode_batch(paths, *batch_bounds(k, batch_size, len(paths)), preprocess)
        ks.append(k)
        images.append(batch.numpy().tobytes())
        skipped.append(json.dumps(skip))
    return {"k": np.array(ks, dtype=np.int64), "images": np.array(images, dtype=object),
            "skipped": np.array(skipped, dtype=object)}


class _ModelWorker:
    """Ray Data actor: loads the feature model once, then per batch normalises, runs, pools and writes its shard."""

    def __init__(self, model_name: str, indices: List[int], checkpoint_path: str, pretrained: bool,
                 dtype_name: str, device: str, pool: str, preprocess: Preprocess, level_keys: List[str],
                 out_dir: str, threads: int, driver_version: str, store_dtype_name: str = "", layout: str = "nchw"):
        if __version__ != driver_version:
            raise RuntimeError(f"this Ray worker imports featurezoo {__version__} from "
                               f"{os.path.dirname(os.path.dirname(__file__))}, the driver runs {driver_version}; "
                               f"install the same featurezoo on every node (or set PYTHONPATH for `ray start`)")
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype_name)
        self.store_dtype = getattr(torch, store_dtype_name or dtype_name)
        self.model = build_feature_model(model_name, indices, checkpoint_path, pretrained, tuple(preprocess.size))
        self.model.to(device=self.device, dtype=self.dtype)
        self.pool, self.preprocess, self.keys, self.out, self.layout = pool, preprocess, level_keys, out_dir, layout

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        h, w = self.preprocess.size
        ks, rows, shards = [], [], []
        for k, images in zip(batch["k"], batch["images"]):
            n = len(images) // (h * w * 3)
            shard = ""
            if n:
                pixels = torch.from_numpy(np.frombuffer(images, dtype=np.uint8).reshape(n, h, w, 3).copy())
                with torch.inference_mode():
                    x = self.preprocess.normalize(pixels.to(self.device), self.dtype)
                    feats = pool_features(self.model(x), self.pool)
                    tensors = {key: f.to("cpu", self.store_dtype) for key, f in zip(self.keys, feats)}
                shard = write_shard(self.out, int(k), tensors, n, self.layout)
            ks.append(int(k))
            rows.append(n)
            shards.append(shard)
        return {"k": np.array(ks, dtype=np.int64), "rows": np.array(rows, dtype=np.int64),
                "skipped": batch["skipped"], "shard": np.array(shards, dtype=object)}


def default_model_workers(cluster: Dict[str, float], cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Model workers for a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    With GPUs: as many as the GPUs hold. On CPUs: one per ``cpus_per_worker + 1``
    CPUs, so that about one CPU per model worker is left for decoding.

    >>> default_model_workers({"CPU": 64.0, "GPU": 8.0}, 1, 1), default_model_workers({"CPU": 2.0}, 1, 0)
    (8, 1)
    """
    if gpus_per_worker:
        return max(1, math.floor(cluster.get("GPU", 0.0) / gpus_per_worker + 1e-9))
    return max(1, math.floor(cluster.get("CPU", 0.0) / (cpus_per_worker + 1) + 1e-9))


def _check_resources(cluster: Dict[str, float], workers: int, cpus: float, gpus: float, address: str) -> None:
    """Refuse a pool that cannot start, or that would leave no CPU to decode on (Ray Data would wait forever)."""
    total_cpus, total_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if gpus and workers * gpus > total_gpus + 1e-9:
        raise ExtractError(f"{workers} model worker(s) x {gpus:g} GPU need {workers * gpus:g} GPU(s); the Ray "
                           f"cluster at {address} has {total_gpus:g}")
    if workers * cpus + 1 > total_cpus + 1e-9:
        raise ExtractError(f"{workers} model worker(s) x {cpus:g} CPU leave no CPU for decoding; the Ray cluster "
                           f"at {address} has {total_cpus:g} CPU(s): lower --model-workers or --cpus-per-worker")


# -- the run -------------------------------------------------------------------------------------------------
def _positive(name: str, value: Optional[Union[int, float]], integer: bool = False, zero: bool = False) -> None:
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
    if not ok or not (value >= 0 if zero else value > 0) or not math.isfinite(value):
        kind = "integer" if integer else "number"
        raise ExtractError(f"{name} must be a {'non-negative' if zero else 'positive'} {kind}, got {value!r}")


def extract_on_ray(model_name: str, inputs: Iterable[PathLike], out_dir: PathLike, *,
                   device: Union[str, torch.device] = "cpu", overwrite: bool = False, threads: Optional[int] = None,
                   progress: bool = False, address: Optional[str] = None, model_workers: Optional[int] = None,
                   cpus_per_worker: Optional[float] = None, gpus_per_worker: Optional[float] = None,
                   **job_args: Any) -> ExtractSummary:
    """:func:`~featurezoo.extract.extract_features` on a Ray cluster (``engine="ray"``).

    ``job_args`` are the engine-independent arguments (``out_indices``, ``pool``, ``batch_size``, ...).

    Args:
        address: ``None`` starts a local Ray instance for the run and shuts it
            down after; ``"auto"`` or ``HOST:PORT`` joins a running cluster
            (one that does not answer fails in seconds, writing nothing).
        model_workers: model actors (default: :func:`default_model_workers`).
        cpus_per_worker: CPUs each model actor reserves (default 1); also its
            torch threads unless ``threads`` is given.
        gpus_per_worker: GPUs each model actor reserves (default 0); above 0
            the model runs on CUDA. ``device="cuda"`` alone means 1.
    """
    ray = _ray()  # a missing Ray is the first thing to say, before any other check
    if address not in (None, "auto") and not ray.is_initialized():
        check_reachable(address)  # seconds, before the model is probed
    _positive("model workers", model_workers, integer=True)
    _positive("cpus per worker", cpus_per_worker)
    _positive("gpus per worker", gpus_per_worker, zero=True)
    if threads is not None:
        _positive("threads", threads, integer=True)
    dev = _worker_device(device, gpus_per_worker)
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if dev.type == "cuda" else 0.0)
    cpus = cpus_per_worker if cpus_per_worker is not None else 1.0
    job = check_arguments(model_name, inputs, out_dir, device=dev, **job_args)
    where = address or "a local Ray instance"
    with ray_session(address) as ray, _quiet_data_context(ray):
        cluster = ray.cluster_resources()
        workers = model_workers or default_model_workers(cluster, cpus, gpus)
        _check_resources(cluster, workers, cpus, gpus, where)
        t_list = time.perf_counter()
        paths = list_inputs(job, list_inputs_on_ray)
        _logger.info("listed %d inputs on the cluster in %.1f s", len(paths), time.perf_counter() - t_list)
        plan = prepare(job, paths, overwrite)
        done_already = already_complete(plan, "ray")
        if done_already is not None:
            return done_already
        warn_random_init(job)
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        done = plan.store.begin(overwrite=overwrite, versions=versions(), engine="ray")
        try:
            return _run(ray, plan, done, workers, cpus, gpus, threads or max(1, int(cpus)), progress, nodes,
                        address)
        finally:
            plan.store.close()


def _worker_device(device: Union[str, torch.device], gpus_per_worker: Optional[float]) -> torch.device:
    """Where the model workers run: CUDA when they hold GPUs. Not checked here: this machine may have none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ExtractError(f"device {device!r} is not valid; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda") or dev.index is not None:
        raise ExtractError(f"device {device!r} is not valid with engine 'ray': use cpu or cuda (Ray gives each "
                           f"model worker its GPUs; choose how many with --gpus-per-worker)")
    if gpus_per_worker:
        return torch.device("cuda")
    if dev.type == "cuda" and gpus_per_worker == 0:
        raise ExtractError("device 'cuda' with 0 GPUs per worker: pass --gpus-per-worker (e.g. 1) or --device cpu")
    return dev


def _run(ray: ModuleType, plan: Plan, done: int, workers: int, cpus: float, gpus: float, threads: int,
         progress: bool, nodes: int, address: Optional[str]) -> ExtractSummary:
    store, job = plan.store, plan.job
    n_batches = (len(store.paths) + store.batch_size - 1) // store.batch_size
    pending = n_batches - done
    before = store.counts()
    if not pending:  # another run finished it between this run's first look and its lock: only record that
        return finish(plan, before, done, 0.0, {"ray": {"address": address or "local", "nodes": nodes},
                                                "device": job.device.type}, engine="ray", nodes=nodes)
    if done:
        _logger.info("%s: resuming, %d of %d batches already done", store.out, done, n_batches)
    _logger.info("ray: %d model worker(s) x (%g CPU, %g GPU), %d node(s)", workers, cpus, gpus, nodes)
    bar = progress_bar(len(store.paths), before["rows"] + before["skipped"], progress)
    t0 = time.perf_counter()
    paths_ref = ray.put(PackedPaths.pack(store.paths))
    blocks = min(pending, MAX_BLOCKS)
    h, w = job.preprocess.size
    ds = ray.data.range(pending, override_num_blocks=blocks)
    ds = ds.map_batches(
        _decode, batch_size=None, batch_format="numpy", num_cpus=1,
        fn_kwargs=dict(paths_ref=[paths_ref], first=done, batch_size=store.batch_size, preprocess=job.preprocess),
        # What a decode task holds: its block's crops (twice: list and bytes) and one large image being decoded.
        # Resources that differ from the model stage's also keep Ray Data from fusing decoding into the model
        # actors (it fuses a task stage into the next actor stage when they agree): the model never waits for it.
        memory=2 * math.ceil(pending / blocks) * store.batch_size * h * w * 3 + DECODE_MEMORY,
    )
    ds = ds.map_batches(
        _ModelWorker, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus, num_gpus=gpus,
        fn_constructor_kwargs=dict(model_name=job.model_name, indices=job.indices,
                                   checkpoint_path=os.fspath(job.checkpoint_path), pretrained=job.pretrained,
                                   dtype_name=job.dtype_name, device=job.device.type, pool=job.pool,
                                   preprocess=job.preprocess, level_keys=plan.level_keys, out_dir=str(store.out),
                                   threads=threads, driver_version=__version__,
                                   store_dtype_name=job.store_dtype_name,
                                   layout=store.settings.get("layout", "nchw")),
    )
    finished: Dict[int, Tuple[str, int, List[Tuple[int, str]]]] = {}  # batches done but not yet indexed
    next_k, n_skipped = done, before["skipped"]
    first = True
    try:
        for result in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first:
                _logger.info("first batch done %.1f s after the start (model workers loading, decoding)",
                             time.perf_counter() - t0)
                first = False
            for k, rows, skipped, shard in zip(result["k"], result["rows"], result["skipped"], result["shard"]):
                k = int(k)
                if k < next_k or k in finished:  # a retried task's second answer: the first was kept
                    continue
                skip = [(int(pos), str(reason)) for pos, reason in json.loads(skipped)]
                finished[k] = (str(shard), int(rows), skip)
                for pos, reason in skip:
                    _logger.info("skipped %s: %s", store.paths[pos], reason)
                n_skipped += len(skip)
                if bar is not None:
                    if skip:
                        bar.set_postfix(skipped=n_skipped, refresh=False)
                    bar.update(int(rows) + len(skip))
            while next_k in finished:
                shard, rows, skip = finished.pop(next_k)
                store.record_batch(next_k, shard or None, rows, skip)
                next_k += 1
    finally:
        if bar is not None:
            bar.close()
    if next_k != n_batches:
        raise RuntimeError(f"the Ray pipeline ended after {next_k} of {n_batches} batches (missing: "
                           f"{sorted(set(range(next_k, n_batches)) - set(finished))[:5]}...)")
    seconds = time.perf_counter() - t0
    return finish(plan, before, done, seconds,
                  {"ray": {"address": address or "local", "nodes": nodes, "model_workers": workers,
                           "cpus_per_worker": cpus, "gpus_per_worker": gpus, "threads": threads},
                   "device": job.device.type},
                  engine="ray", model_workers=workers, nodes=nodes)
