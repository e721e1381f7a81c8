"""Features out: the output directory of ``featurezoo extract`` and its reader.

Layout of ``OUT``::

    meta.json          settings (model, weights, levels, preprocessing, ...), versions, status,
                       the engine of the latest run, and the figures of each run
    inputs.json        the sorted list of input paths; batch k is inputs[k*B:(k+1)*B]
    index.jsonl        one line per input, in input order, written after its shard:
                       {"i": 7, "path": "...", "shard": "shards/000001.safetensors", "row": 3}
                       {"i": 8, "path": "...", "skipped": "not an image"}
    shards/NNNNNN.safetensors   batch NNNNNN: one tensor per feature level, rows aligned

Every file is written with :func:`featurezoo.atomic.atomic_write` (a
temporary name, fsync, rename, fsync of the folder); only after its shard is
in place are a batch's lines appended to the index. So the index never names
a partial shard, and the index's complete batches are always a prefix of the batches:
resuming re-reads that prefix, cuts off a torn last line, removes any shard
past it, and carries on with the next batch.

The local engine writes shards through :meth:`FeatureStore.write_batch`. The
Ray engine's model workers, on any node, write them with :func:`write_shard`
(possibly out of order), and the driver appends their index lines with
:meth:`FeatureStore.record_batch` in batch order, once each shard is in place:
the same two rules hold.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write, write_bytes_atomic, write_json_atomic
from .data import ExtractError, PathLike, batch_bounds

__all__ = ["FeatureStore", "Features", "load_features", "iter_shards", "write_safetensors", "write_shard",
           "inputs_digest", "shard_name", "FORMAT", "FORMAT_VERSION"]

_logger = logging.getLogger(__name__)

FORMAT = "featurezoo-features"
FORMAT_VERSION = 1
META, INPUTS, INDEX, SHARDS, LOCK = "meta.json", "inputs.json", "index.jsonl", "shards", ".lock"
_OWN_FILES = (META, INPUTS, INDEX, LOCK)

# Settings whose change makes old rows incompatible with new ones, in the order they are reported.
SETTING_KEYS = ("model", "weights", "out_indices", "pool", "dtype", "store_dtype", "device", "size",
                "preprocessing", "batch_size", "inputs", "levels")


def shard_name(batch: int) -> str:
    return f"{SHARDS}/{batch:06d}.safetensors"


def inputs_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class _IndexState:
    done_batches: int = 0
    good_bytes: int = 0  # length of the index file's valid prefix
    rows: int = 0
    skipped: int = 0
    records: Optional[List[Dict[str, Any]]] = None  # one per input of the done batches, if asked for


def _scan_index(out: Path, n_inputs: int, batch_size: int, keep_records: bool = False) -> _IndexState:
    """Read the valid prefix of ``index.jsonl``: complete batches, in order, whose shards exist."""
    state = _IndexState(records=[] if keep_records else None)
    try:
        data = (out / INDEX).read_bytes()
    except FileNotFoundError:
        return state
    batch: List[Dict[str, Any]] = []
    present: set = set()
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            break  # a torn last line
        try:
            rec = json.loads(data[offset:end])
        except ValueError:
            break
        k = state.done_batches
        start, stop = k * batch_size, min((k + 1) * batch_size, n_inputs)
        if not isinstance(rec, dict) or rec.get("i") != start + len(batch) or start >= n_inputs:
            break
        shard = rec.get("shard")
        if shard is not None and shard not in present:
            if not (out / shard).is_file():
                break
            present.add(shard)
        batch.append(rec)
        offset = end + 1
        if start + len(batch) == stop:
            skipped = sum(1 for r in batch if "skipped" in r)
            state.rows += len(batch) - skipped
            state.skipped += skipped
            if state.records is not None:
                state.records.extend(batch)
            batch = []
            state.done_batches += 1
            state.good_bytes = offset
    return state


def _lock(out: Path):
    """An exclusive lock on ``OUT/.lock`` for the lifetime of the returned file (POSIX only)."""
    f = open(out / LOCK, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ExtractError(f"{out} is being written by another featurezoo process; "
                           f"wait for it or use another -o") from None
    return f


def check_writable(out: Path) -> None:
    """Raise :class:`ExtractError` unless ``out`` is, or can be created as, a writable directory."""
    if out.exists() and not out.is_dir():
        raise ExtractError(f"output {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise ExtractError(f"cannot create output directory {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExtractError(f"output directory {out} is not writable (no write permission on {probe})")


def describe_difference(key: str, old: Any, new: Any, old_inputs: Optional[List[str]] = None,
                        new_inputs: Optional[List[str]] = None) -> str:
    if key == "inputs" and old_inputs is not None and new_inputs is not None:
        gone = sorted(set(old_inputs) - set(new_inputs))
        added = sorted(set(new_inputs) - set(old_inputs))
        parts = []
        if added:
            parts.append(f"{len(added)} new (e.g. {added[0]})")
        if gone:
            parts.append(f"{len(gone)} no longer given (e.g. {gone[0]})")
        return f"the inputs differ: {', '.join(parts) or 'same files, different order'}"
    return f"{key} was {json.dumps(old)}, this run asks {json.dumps(new)}"


class FeatureStore:
    """Writes one output directory; see the module docstring for the layout.

    Use :meth:`open` (validates, creates nothing), then :meth:`begin` (creates
    or resumes), :meth:`write_batch` per batch in order, :meth:`finish`.
    """

    def __init__(self, out: Path, settings: Dict[str, Any], paths: List[str], batch_size: int):
        self.out = out
        self.settings = settings
        self.paths = paths
        self.batch_size = batch_size
        self.state = _IndexState()
        self.meta: Dict[str, Any] = {}
        self._lock_file = None
        self._index_file = None

    @classmethod
    def open(cls, out_dir: PathLike, settings: Dict[str, Any], paths: List[str], batch_size: int,
             overwrite: bool = False) -> "FeatureStore":
        """Check that ``out_dir`` can take this run, writing nothing (:class:`ExtractError` if not)."""
        out = Path(os.path.abspath(os.fspath(out_dir)))
        check_writable(out)
        store = cls(out, settings, paths, batch_size)
        if out.is_dir() and any(out.iterdir()):
            if not (out / META).is_file():
                # Only our own files: a run killed before it wrote meta.json. Anything else is someone's data.
                if any(p.name not in (*_OWN_FILES, SHARDS) for p in out.iterdir()):
                    raise ExtractError(f"output directory {out} is not empty and holds no featurezoo features "
                                       f"({META} missing); use an empty or new directory")
            elif not overwrite:
                store._check_compatible()
                store.state = _scan_index(out, len(paths), batch_size)
        return store

    def _check_compatible(self) -> None:
        try:
            meta = _read_json(self.out / META)
        except (OSError, ValueError) as e:
            raise ExtractError(f"{self.out / META} is unreadable ({e}); use --overwrite to start again") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ExtractError(f"{self.out} holds format {meta.get('format')!r} version "
                               f"{meta.get('format_version')!r}, this featurezoo writes {FORMAT!r} version "
                               f"{FORMAT_VERSION}; use --overwrite or another -o")
        old = meta.get("settings", {})
        for key in SETTING_KEYS:
            if old.get(key) != self.settings.get(key):
                old_inputs = None
                if key == "inputs":
                    try:
                        old_inputs = _read_json(self.out / INPUTS)
                    except (OSError, ValueError):
                        pass
                diff = describe_difference(key, old.get(key), self.settings.get(key), old_inputs, self.paths)
                raise ExtractError(f"{self.out} already holds features made with different settings: {diff}; "
                                   f"rerun with the same arguments to resume, or pass --overwrite to replace them")

    # -- writing -----------------------------------------------------------------------------
    def begin(self, overwrite: bool = False, versions: Optional[Mapping[str, str]] = None,
              engine: str = "local") -> int:
        """Create or resume the directory; return the number of batches already done.

        ``engine`` (``"local"``, ``"ray"``) is recorded in ``meta.json``: the
        engine writing now. It is not a setting: both write the same rows, so
        either may resume the other's run.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.out)
        if overwrite:
            for name in (META, INPUTS, INDEX):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / SHARDS, ignore_errors=True)
        (self.out / SHARDS).mkdir(exist_ok=True)
        n = len(self.paths)
        if (self.out / META).is_file():
            self.meta = _read_json(self.out / META)
            self.state = _scan_index(self.out, n, self.batch_size)
            with open(self.out / INDEX, "ab") as f:
                f.truncate(self.state.good_bytes)
        else:
            write_json_atomic(self.out / INPUTS, self.paths)
            write_bytes_atomic(self.out / INDEX, b"")
            self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": self.settings}
        self.meta["versions"] = dict(versions or {})
        self.meta["engine"] = engine
        self.meta["status"] = {"complete": self.complete, **self.counts()}
        write_json_atomic(self.out / META, self.meta)
        self._remove_stale_shards()
        self._index_file = open(self.out / INDEX, "ab")
        return self.state.done_batches

    def _remove_stale_shards(self) -> None:
        """Temporary files of a killed run, and shards written but never indexed, are garbage."""
        for p in (self.out / SHARDS).iterdir():
            name = p.name
            stem = name.split(".")[0]
            if name.startswith(".") or not stem.isdigit() or int(stem) >= self.state.done_batches:
                p.unlink(missing_ok=True)

    def write_batch(self, k: int, tensors: Mapping[str, torch.Tensor], rows: Sequence[int],
                    skipped: Sequence[Tuple[int, str]]) -> None:
        """Write batch ``k`` (the next one): its shard, then its index lines."""
        self._check_next(k)
        shard = write_shard(self.out, k, tensors, len(rows)) if rows else None
        self.record_batch(k, shard, len(rows), skipped)

    def _check_next(self, k: int) -> None:
        if k != self.state.done_batches:
            raise RuntimeError(f"batch {k} written out of order; expected batch {self.state.done_batches}")

    def record_batch(self, k: int, shard: Optional[str], n_rows: int, skipped: Sequence[Tuple[int, str]]) -> None:
        """Append the index lines of batch ``k`` (the next one), whose shard (if it has rows) is in place.

        The rows are the batch's positions not in ``skipped``, in order; an
        engine that wrote the shard elsewhere (:func:`write_shard`) says how
        many there are, and a mismatch is an error, not a misaligned index.
        """
        self._check_next(k)
        start, stop = batch_bounds(k, self.batch_size, len(self.paths))
        reasons = dict(skipped)
        if n_rows != (stop - start) - len(reasons) or any(not start <= pos < stop for pos in reasons):
            raise RuntimeError(f"batch {k}: {n_rows} rows and {len(reasons)} skipped do not make its "
                               f"{stop - start} inputs")
        if (shard is None) != (n_rows == 0):
            raise RuntimeError(f"batch {k}: {n_rows} rows but shard {shard!r}")
        lines, row = [], 0
        for pos in range(start, stop):
            rec: Dict[str, Any] = {"i": pos, "path": self.paths[pos]}
            if pos in reasons:
                rec["skipped"] = reasons[pos]
            else:
                rec.update(shard=shard, row=row)
                row += 1
            lines.append(json.dumps(rec))  # ASCII: json escapes the rest, undecodable file names too
        self._index_file.write(("\n".join(lines) + "\n").encode("ascii"))
        self._index_file.flush()
        os.fsync(self._index_file.fileno())
        self.state.rows += n_rows
        self.state.skipped += len(reasons)
        self.state.done_batches += 1

    def counts(self) -> Dict[str, int]:
        return {"inputs": len(self.paths), "rows": self.state.rows, "skipped": self.state.skipped}

    @property
    def complete(self) -> bool:
        return self.state.done_batches * self.batch_size >= len(self.paths)

    def finish(self, run: Mapping[str, Any]) -> None:
        """Record the outcome, and this run's figures in the run history."""
        self.meta["status"] = {"complete": self.complete, **self.counts()}
        self.meta.setdefault("runs", []).append(dict(run))
        write_json_atomic(self.out / META, self.meta)

    def close(self) -> None:
        for f in (self._index_file, self._lock_file):
            if f is not None:
                f.close()
        self._index_file = self._lock_file = None


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_shard(out: Path, k: int, tensors: Mapping[str, torch.Tensor], n_rows: int) -> str:
    """Write batch ``k``'s shard into ``out`` (atomically: a reader or a resumed run never sees part of it).

    Returns its name relative to ``out``, as the index records it. Needs no
    :class:`FeatureStore`: a Ray model worker on another machine writes its shards with it.
    """
    name = shard_name(k)
    write_safetensors(Path(out) / name, tensors, {"format": FORMAT, "batch": str(k), "rows": str(n_rows)})
    return name


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write CPU ``tensors`` as a safetensors file at ``path``, atomically.

    Equivalent to ``safetensors.torch.save_file`` (and read back by it), but the
    tensor bytes go straight from tensor memory to ``write()``, which releases
    the GIL: on a shard writer thread, the model's thread keeps running.
    """
    if sys.byteorder != "little":  # the format is little-endian; let the library convert
        with atomic_path(path) as tmp:
            save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=dict(metadata))
        return
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    arrays = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if nbytes:
            arrays.append(t.reshape(-1).view(torch.uint8).numpy())
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with atomic_write(path, "wb", buffering=0) as f:
        for a in [struct.pack("<Q", len(head)) + head, *arrays]:
            view = memoryview(a)
            while view:  # a raw write may be partial
                view = view[f.write(view):]


# -- reading ------------------------------------------------------------------------------------
@dataclass
class Features:
    """What :func:`load_features` returns.

    ``levels`` maps each feature level's module name (in ``out_indices``
    order) to a tensor whose row ``j`` belongs to ``paths[j]``; ``(N, C, H, W)``
    or, pooled, ``(N, C)``. Tensors keep the stored dtype (``bfloat16`` has no
    numpy twin; call ``.float().numpy()`` for numpy).
    """

    paths: List[str]
    levels: Dict[str, torch.Tensor]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("status", {}).get("complete"))


def _open_for_reading(out_dir: PathLike) -> Tuple[Path, Dict[str, Any], _IndexState]:
    out = Path(out_dir)
    try:
        meta = _read_json(out / META)
    except FileNotFoundError:
        raise ExtractError(f"{out} holds no featurezoo features ({META} missing)") from None
    if meta.get("format") != FORMAT:
        raise ExtractError(f"{out / META} is not a featurezoo features file")
    settings = meta["settings"]
    state = _scan_index(out, settings["inputs"]["count"], settings["batch_size"], keep_records=True)
    return out, meta, state


def iter_shards(out_dir: PathLike) -> Iterator[Tuple[List[str], Dict[str, torch.Tensor]]]:
    """Yield ``(paths, {level: tensor})`` per shard, in input order (memory: one shard at a time)."""
    out, meta, state = _open_for_reading(out_dir)
    levels = [lv["key"] for lv in meta["settings"]["levels"]]
    by_shard: Dict[str, List[Dict[str, Any]]] = {}
    for rec in state.records:
        if "shard" in rec:
            by_shard.setdefault(rec["shard"], []).append(rec)
    for shard, recs in by_shard.items():
        with safe_open(str(out / shard), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in levels}
        n = tensors[levels[0]].shape[0]
        if n != len(recs) or [r["row"] for r in recs] != list(range(n)):
            raise ExtractError(f"{out / shard} has {n} rows but the index names {len(recs)}; the directory is damaged")
        yield [r["path"] for r in recs], tensors


def load_features(out_dir: PathLike) -> Features:
    """Read a whole output directory into memory (the complete batches, when a run was cut short)."""
    out, meta, state = _open_for_reading(out_dir)
    levels = [lv["key"] for lv in meta["settings"]["levels"]]
    paths: List[str] = []
    parts: Dict[str, List[torch.Tensor]] = {name: [] for name in levels}
    for shard_paths, tensors in iter_shards(out):
        paths.extend(shard_paths)
        for name in levels:
            parts[name].append(tensors[name])
    dtype = getattr(torch, meta["settings"].get("store_dtype", meta["settings"]["dtype"]))  # as stored
    result = {}
    for lv in meta["settings"]["levels"]:
        name = lv["key"]
        result[name] = torch.cat(parts[name]) if parts[name] else torch.empty((0, *lv["shape"]), dtype=dtype)
    skipped = [(r["path"], r["skipped"]) for r in state.records if "skipped" in r]
    return Features(paths, result, skipped, meta)
