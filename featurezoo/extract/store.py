"""Features out: the output directory of ``featurezoo extract`` and its reader.

Layout of ``OUT``::

    meta.json          settings (model, weights, levels, preprocessing, ...), versions, status,
                       the engine of the latest run, and the figures of each run
    inputs.json        the sorted list of input paths; batch k is inputs[k*B:(k+1)*B]
    index.jsonl        one line per input, in input order, written after its shard:
                       {"i": 7, "path": "...", "shard": "shards/000001.safetensors", "row": 3}
                       {"i": 8, "path": "...", "skipped": "not an image"}
    shards/NNNNNN.safetensors   batch NNNNNN: one tensor per feature level, rows aligned; unpooled
                       maps are stored (N, H, W, C) where the settings say "layout": "nhwc" (the
                       default of new runs: the inference path's channels-last maps go to disk
                       without a transpose), else (N, C, H, W); pooled features (N, C)

:func:`load_features` and :func:`iter_shards` return maps as ``(N, C, H, W)``
tensors either way (an ``nhwc`` directory's are channels-last views of the
stored memory: no copy). Version 1 directories (no ``layout``: ``nchw``) are
read, and resumed, as they are.

Every file is written with :func:`featurezoo.atomic.atomic_write` or
:func:`~featurezoo.atomic.atomic_path` (a temporary name, fsync, rename, fsync of the folder); only after its shard is
in place are a batch's lines appended to the index. So the index never names
a partial shard, and the index's complete batches are always a prefix of the batches:
resuming re-reads that prefix, cuts off a torn last line, removes any shard
past it, and carries on with the next batch.

The local engine writes shards through :meth:`FeatureStore.write_batch`. The
Ray engine's model workers, on any node, write them with :func:`write_shard`
(possibly out of order), and the driver appends their index lines with
:meth:`FeatureStore.record_batch` in batch order, once each shard is in place:
the same two rules hold.

Every decision about an existing ``OUT`` (same settings? which batches are
done?) is taken again under the lock by :meth:`FeatureStore.begin`:
:meth:`FeatureStore.open` only checks early, so that a second run started at
the same moment cannot resume, or finish as "complete", over a run with other
settings. A directory without ``meta.json`` holding only featurezoo's own
files (temporary ones included) is a run killed before its first ``meta.json``
was in place, and is started afresh.

Both the resume scan and the reader check each shard the index names from its
header (tensors, dtype, shape, rows, file length): the resume redoes a
missing, truncated or mismatched shard and every batch after it (logging
which); :func:`load_features` refuses, naming the file and the remedy, and
never returns part of the rows of a run ``meta.json`` calls complete.

Fault injection (test-only, see :mod:`featurezoo.atomic`): the write steps
are ``meta``, ``inputs``, ``index`` (the empty index of a new run) and
``shard``, each with its points ``STEP.begin``, ``STEP.data`` and
``STEP.rename``; ``shard.partial`` (header written, data not); ``append.before``
and ``append.after`` (a batch's index lines, before the write and after the
fsync); ``overwrite`` (``--overwrite``: the old ``meta.json`` removed, the rest
not yet). ``FEATUREZOO_FAULT=shard.data:2`` kills the process when the second
shard it writes is complete but not yet renamed.

Layer: application (the extraction library).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write, fault_point, is_temp_name, write_bytes_atomic, write_json_atomic
from .data import ExtractError, PathLike, batch_bounds

__all__ = ["FeatureStore", "Features", "load_features", "iter_shards", "write_safetensors", "write_shard",
           "inputs_digest", "shard_name", "FORMAT", "FORMAT_VERSION", "LAYOUTS", "DEFAULT_LAYOUT", "to_stored",
           "from_stored", "existing_layout"]

_logger = logging.getLogger(__name__)

FORMAT = "featurezoo-features"
FORMAT_VERSION = 2  # 2: settings may say "layout": "nhwc" (version 1 directories are NCHW, and still read)
_READ_VERSIONS = (1, 2)
# How unpooled (C, H, W) maps are stored: "nhwc" (the default of a new run) or "nchw". Absent from the
# settings: "nchw" (version 1 directories, and runs that ask for it).
LAYOUTS = ("nhwc", "nchw")
DEFAULT_LAYOUT = "nhwc"
META, INPUTS, INDEX, SHARDS, LOCK = "meta.json", "inputs.json", "index.jsonl", "shards", ".lock"
_OWN_FILES = (META, INPUTS, INDEX, LOCK)

# Settings whose change makes old rows incompatible with new ones, in the order they are reported.
SETTING_KEYS = ("model", "weights", "out_indices", "pool", "dtype", "store_dtype", "layout", "device", "size",
                "preprocessing", "batch_size", "inputs", "levels")
# A safetensors header longer than this is not one of ours (ours name a few tensors: under 1 KB a level).
_MAX_HEADER = 1 << 24
# The stored dtypes (settings "store_dtype", else "dtype") and their safetensors codes.
_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def shard_name(batch: int) -> str:
    return f"{SHARDS}/{batch:06d}.safetensors"


def _stored_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
    """The stored shape of a row of logical ``shape``: a ``(C, H, W)`` map is ``(H, W, C)`` in ``nhwc``."""
    return (*shape[1:], shape[0]) if layout == "nhwc" and len(shape) == 3 else shape


def to_stored(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``(N, C, H, W)`` batch ``t`` as it is stored in ``layout`` (a view: ``(N, H, W, C)`` for ``nhwc``,
    contiguous when ``t`` is channels-last, as the inference path's maps are)."""
    return t.permute(0, 2, 3, 1) if layout == "nhwc" and t.dim() == 4 else t


def from_stored(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A stored batch as ``(N, C, H, W)`` (for ``nhwc``, a channels-last view of the same memory)."""
    return t.permute(0, 3, 1, 2) if layout == "nhwc" and t.dim() == 4 else t


def existing_layout(out_dir: PathLike) -> Optional[str]:
    """The layout of the run in ``out_dir`` (``"nchw"`` for a directory that names none), or ``None`` where it
    holds no readable features (the checks that follow say what is wrong, if anything)."""
    try:
        meta = _read_meta(Path(out_dir))
    except ExtractError:
        return None
    return meta["settings"].get("layout", "nchw")


def inputs_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_START_AGAIN = "rerun the extraction with --overwrite (or into a new -o) to start again"


def _read_meta(out: Path) -> Dict[str, Any]:
    """``OUT/meta.json``, checked to be featurezoo's, of this format version, and whole; else :class:`ExtractError`."""
    path = out / META
    try:
        meta = _read_json(path)
    except FileNotFoundError:
        raise ExtractError(f"{out} holds no featurezoo features ({META} missing); if a run into it was killed "
                           f"before it began, run the extraction again") from None
    except (OSError, ValueError) as e:
        raise ExtractError(f"{path} is unreadable ({e}); {_START_AGAIN}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExtractError(f"{path} is not a featurezoo features file; use an empty or new -o")
    if meta.get("format_version") not in _READ_VERSIONS:
        raise ExtractError(f"{path} is format {FORMAT!r} version {meta.get('format_version')!r}, this featurezoo "
                           f"reads versions {', '.join(map(str, _READ_VERSIONS))}; {_START_AGAIN}")
    problem = _settings_problem(meta.get("settings"))
    if problem:
        raise ExtractError(f"{path} is damaged: {problem}; {_START_AGAIN}")
    return meta


def _settings_problem(settings: Any) -> Optional[str]:
    """What is wrong with the stored settings the index and shards are read by, or ``None``."""
    if not isinstance(settings, dict):
        return "no settings"

    def count(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not count(settings.get("batch_size"), 1):
        return f"settings.batch_size is {settings.get('batch_size')!r}, not a positive integer"
    inputs = settings.get("inputs")
    if not isinstance(inputs, dict) or not count(inputs.get("count"), 0):
        return "settings.inputs.count is missing or not a count"
    for key in ("dtype", "store_dtype"):
        if (key == "dtype" or key in settings) and settings.get(key) not in _DTYPE_CODES:
            return f"settings.{key} is {settings.get(key)!r}, not one of {', '.join(_DTYPE_CODES)}"
    if "layout" in settings and settings["layout"] not in LAYOUTS:
        return f"settings.layout is {settings['layout']!r}, not one of {', '.join(LAYOUTS)}"
    levels = settings.get("levels")
    if not isinstance(levels, list) or not levels:
        return "settings.levels is missing or empty"
    for lv in levels:
        if not (isinstance(lv, dict) and isinstance(lv.get("key"), str) and isinstance(lv.get("shape"), list)
                and all(count(d, 1) for d in lv["shape"])):
            return f"settings.levels has an entry without a name and a shape: {lv!r}"
    return None


@dataclass(frozen=True)
class _Layout:
    """What the index and the shards of one output directory must agree with, from its settings."""

    n_inputs: int
    batch_size: int
    levels: Tuple[Tuple[str, Tuple[int, ...]], ...]  # (tensor name, shape of one stored row)
    dtype: str  # safetensors dtype code
    paths: Optional[Sequence[str]] = None  # the inputs, where known (a run): each index line's path is checked
    layout: str = "nchw"  # of the maps

    @classmethod
    def of(cls, settings: Mapping[str, Any], paths: Optional[Sequence[str]] = None) -> "_Layout":
        layout = settings.get("layout", "nchw")
        levels = tuple((lv["key"], _stored_shape(tuple(lv["shape"]), layout)) for lv in settings["levels"])
        return cls(settings["inputs"]["count"], settings["batch_size"], levels,
                   _DTYPE_CODES[settings.get("store_dtype", settings["dtype"])], paths, layout)


@dataclass
class _IndexState:
    done_batches: int = 0
    good_bytes: int = 0  # length of the index file's valid prefix
    rows: int = 0
    skipped: int = 0
    records: Optional[List[Dict[str, Any]]] = None  # one per input of the done batches, if asked for
    damage: Optional[str] = None  # why the scan stopped short, unless at the end or at a torn last batch


def _scan_index(out: Path, layout: _Layout, keep_records: bool = False) -> _IndexState:
    """Read the valid prefix of ``index.jsonl``: complete batches, in order, whose shards are whole.

    The scan stops at the end of the file, at a torn last batch (lines cut
    short: what a kill while appending leaves), or at damage, which
    ``damage`` then describes, naming the file: a line that is not the next
    input's record, a shard missing, cut short, or not what the settings say.
    """
    state = _IndexState(records=[] if keep_records else None)
    try:
        data = (out / INDEX).read_bytes()
    except FileNotFoundError:
        return state
    batch: List[Dict[str, Any]] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            break  # a torn last line
        k = state.done_batches
        start, stop = batch_bounds(k, layout.batch_size, layout.n_inputs)
        if start >= layout.n_inputs:
            state.damage = f"{out / INDEX} has more lines than the {layout.n_inputs} inputs"
            break
        try:
            rec = json.loads(data[offset:end])
        except ValueError:
            rec = None
        problem = _record_problem(rec, start + len(batch), k, layout)
        if problem:
            state.damage = f"{out / INDEX} line {start + len(batch) + 1} {problem}"
            break
        batch.append(rec)
        offset = end + 1
        if start + len(batch) < stop:
            continue
        rows = [r for r in batch if "skipped" not in r]
        row_numbers = [r["row"] for r in rows]
        if row_numbers != list(range(len(rows))):
            state.damage = f"{out / INDEX} gives batch {k}'s rows as {row_numbers}, not 0 to {len(rows) - 1}"
            break
        problem = _shard_problem(out / shard_name(k), len(rows), layout) if rows else None
        if problem:
            state.damage = f"{out / shard_name(k)} {problem}"
            break
        state.rows += len(rows)
        state.skipped += len(batch) - len(rows)
        if state.records is not None:
            state.records.extend(batch)
        batch = []
        state.done_batches += 1
        state.good_bytes = offset
    return state


def _record_problem(rec: Any, i: int, k: int, layout: _Layout) -> Optional[str]:
    """What is wrong with ``rec`` as the index line of input ``i`` (in batch ``k``), or ``None``."""
    if not isinstance(rec, dict):
        return "is not a JSON record"
    if rec.get("i") != i:
        return f"is input {rec.get('i')!r}, expected input {i}"
    if layout.paths is not None and rec.get("path") != layout.paths[i]:
        return f"names {rec.get('path')!r}, but input {i} is {layout.paths[i]!r}"
    if "skipped" in rec:
        return None if isinstance(rec["skipped"], str) and "shard" not in rec else "is a malformed skip"
    if rec.get("shard") != shard_name(k):
        return f"names shard {rec.get('shard')!r}, batch {k}'s is {shard_name(k)!r}"
    if not isinstance(rec.get("row"), int):
        return "has no row"
    return None


def _shard_problem(path: Path, n_rows: int, layout: _Layout) -> Optional[str]:
    """What is wrong with the shard at ``path`` (read from its header only), or ``None`` if it holds the
    ``n_rows`` rows of every level that the settings describe, with all their bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                return f"is cut short or not a safetensors file ({size} bytes)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"is unreadable ({e.strerror or e})"
    except ValueError:
        return "has a damaged header"
    if not isinstance(header, dict):
        return "has a damaged header"
    try:
        data_end = max((int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"),
                       default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        return "has a damaged header"
    for key, shape in layout.levels:
        entry = header.get(key)
        if not isinstance(entry, dict):
            return f"has no tensor {key!r}"
        want = [n_rows, *shape]
        if entry.get("dtype") != layout.dtype or entry.get("shape") != want:
            stored = f" (layout {layout.layout}: N, H, W, C)" if layout.layout == "nhwc" and len(shape) == 3 else ""
            return (f"holds {key} as {entry.get('dtype')} {entry.get('shape')}, but the index and {META} say "
                    f"{layout.dtype} {want}{stored}")
    if 8 + n + data_end != size:
        return f"is {'cut short' if size < 8 + n + data_end else 'too long'}: {size} bytes, its header says " \
               f"{8 + n + data_end}"
    return None


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
        raise ExtractError(f"{out} is being written by another featurezoo process; wait for it to finish and run "
                           f"again (it resumes, or finds the work done), or use another -o") from None
    return f


def _is_own(name: str) -> bool:
    """Whether a name in ``OUT`` is one of featurezoo's files (or a temporary file of one)."""
    return name in (*_OWN_FILES, SHARDS) or any(is_temp_name(name, base) for base in (META, INPUTS, INDEX))


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

    Use :meth:`open` (checks early, creates nothing), then :meth:`begin`
    (takes the lock, checks again, creates or resumes), :meth:`write_batch`
    per batch in order, :meth:`finish`, :meth:`close`.
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
        """Check that ``out_dir`` can take this run, writing nothing (:class:`ExtractError` if not).

        A first look, without the lock: :meth:`begin` looks again under it.
        """
        out = Path(os.path.abspath(os.fspath(out_dir)))
        check_writable(out)
        store = cls(out, settings, paths, batch_size)
        meta = store._check_contents(overwrite)
        if meta is not None:
            store.meta = meta
            store.state = _scan_index(out, store._layout())
        return store

    def _layout(self) -> _Layout:
        return _Layout.of(self.settings, self.paths)

    def _check_contents(self, overwrite: bool) -> Optional[Dict[str, Any]]:
        """Refuse an ``OUT`` that holds someone else's files, or features with other settings (unless
        ``overwrite``); return its ``meta.json`` when there is one to resume, else ``None``."""
        if not self.out.is_dir():
            return None
        if not (self.out / META).is_file():
            # Only our own files: a run killed before its first meta.json was in place. Else someone's data.
            foreign = sorted(p.name for p in self.out.iterdir() if not _is_own(p.name))
            if foreign:
                raise ExtractError(f"output directory {self.out} is not empty and holds no featurezoo features "
                                   f"({META} missing; found {foreign[0]!r}); use an empty or new directory")
            return None
        if overwrite:
            return None
        meta = _read_meta(self.out)
        old = meta["settings"]
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
        return meta

    @property
    def finished(self) -> bool:
        """Every input is in the index and ``meta.json`` records the run complete: nothing to do or record."""
        return self.complete and bool(self.meta.get("status", {}).get("complete"))

    # -- writing -----------------------------------------------------------------------------
    def begin(self, overwrite: bool = False, versions: Optional[Mapping[str, str]] = None,
              engine: str = "local") -> int:
        """Take the lock, check ``OUT`` again, create or resume it; return the number of batches done.

        Everything :meth:`open` decided is decided again here, under the lock:
        another run may have written ``OUT`` since. ``engine`` (``"local"``,
        ``"ray"``) is recorded in ``meta.json``: the engine writing now. It is
        not a setting: both write the same rows, so either may resume the
        other's run.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_file = _lock(self.out)
        except ExtractError:
            if not overwrite and (self.out / META).is_file():
                self._check_contents(overwrite)  # other settings say more than "busy": waiting would not help
            raise
        try:
            return self._begin_locked(overwrite, versions, engine)
        except BaseException:
            self.close()
            raise

    def _begin_locked(self, overwrite: bool, versions: Optional[Mapping[str, str]], engine: str) -> int:
        meta = self._check_contents(overwrite)
        if overwrite:
            (self.out / META).unlink(missing_ok=True)  # first: from here on, the rest is a new run's garbage
            fault_point("overwrite")
            for name in (INPUTS, INDEX):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / SHARDS, ignore_errors=True)
        for p in self.out.iterdir():  # temporary files of a killed run
            if p.name not in (*_OWN_FILES, SHARDS) and _is_own(p.name):
                p.unlink(missing_ok=True)
        (self.out / SHARDS).mkdir(exist_ok=True)
        if meta is not None:
            self.meta = meta
            self.state = _scan_index(self.out, self._layout())
            if self.state.damage:
                _logger.warning("%s: recomputing batch %d and every batch after it", self.state.damage,
                                self.state.done_batches)
            with open(self.out / INDEX, "ab") as f:
                f.truncate(self.state.good_bytes)
        else:
            self.state = _IndexState()
            write_json_atomic(self.out / INPUTS, self.paths, step="inputs")
            write_bytes_atomic(self.out / INDEX, b"", step="index")
            self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": self.settings}
        self.meta["versions"] = dict(versions or {})
        self.meta["engine"] = engine
        self.meta["status"] = {"complete": self.complete, **self.counts()}
        write_json_atomic(self.out / META, self.meta, step="meta")
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
        shard = write_shard(self.out, k, tensors, len(rows), self.settings.get("layout", "nchw")) if rows else None
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
        fault_point("append.before")
        self._index_file.write(("\n".join(lines) + "\n").encode("ascii"))
        self._index_file.flush()
        os.fsync(self._index_file.fileno())
        fault_point("append.after")
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
        write_json_atomic(self.out / META, self.meta, step="meta")

    def close(self) -> None:
        for f in (self._index_file, self._lock_file):
            if f is not None:
                f.close()
        self._index_file = self._lock_file = None


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_shard(out: Path, k: int, tensors: Mapping[str, torch.Tensor], n_rows: int, layout: str = "nchw") -> str:
    """Write batch ``k``'s shard into ``out`` (atomically: a reader or a resumed run never sees part of it).

    ``tensors`` are ``(N, C, H, W)`` maps (any memory format) or pooled ``(N, C)``; maps are stored in
    ``layout`` (the run's settings' ``layout``, ``"nchw"`` where they name none). Returns the shard's name
    relative to ``out``, as the index records it. Needs no :class:`FeatureStore`: a Ray model worker on
    another machine writes its shards with it.
    """
    name = shard_name(k)
    write_safetensors(Path(out) / name, {key: to_stored(t, layout) for key, t in tensors.items()},
                      {"format": FORMAT, "batch": str(k), "rows": str(n_rows)}, step="shard")
    return name


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      step: Optional[str] = None) -> None:
    """Write CPU ``tensors`` as a safetensors file at ``path``, atomically.

    Equivalent to ``safetensors.torch.save_file`` (and read back by it), but the
    tensor bytes go from tensor memory (through a reused staging buffer with
    O_DIRECT, see :data:`DIRECT_MIN_BYTES`) to ``write()``, which releases the
    GIL: on a shard writer thread, the model's thread keeps running.
    ``step`` names its fault-injection points (test-only, :mod:`featurezoo.atomic`).
    """
    if sys.byteorder != "little":  # the format is little-endian; let the library convert
        with atomic_path(path, step=step) as tmp:
            save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=dict(metadata))
        return
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    head = struct.pack("<Q", len(head)) + head
    with atomic_path(path, step=step) as tmp:
        if offset < DIRECT_MIN_BYTES or not _write_direct(tmp, head, tensors, step):
            with open(tmp, "wb", buffering=0) as f:
                for i, a in enumerate(_byte_parts(head, tensors)):
                    if i == 1 and step:
                        fault_point(f"{step}.partial")
                    view = memoryview(a)
                    while view:  # a raw write may be partial
                        view = view[f.write(view):]


def _byte_parts(head: bytes, tensors: Mapping[str, torch.Tensor]) -> Iterator[Any]:
    """``head``, then each tensor's bytes in C order, as byte views to be consumed one at a time.

    A tensor not in C order (the inference path's channels-last maps) is laid out one row (first index) at
    a time in this thread's row buffer, which is reused: no new tensor of the batch's size is allocated
    (fresh memory costs page faults) and each view is only valid until the next one is taken."""
    yield head
    for t in tensors.values():
        t = t.detach()
        if t.numel() == 0:
            continue
        if t.is_contiguous():
            yield t.reshape(-1).view(torch.uint8).numpy()
            continue
        rows = t if t.dim() > 1 else t.reshape(1, -1)
        row_bytes = rows[0].numel() * t.element_size()
        buf = getattr(_staging, "rows", None)
        if buf is None or buf.numel() < row_bytes:
            buf = _staging.rows = torch.empty(row_bytes, dtype=torch.uint8)
        for row in rows:
            _lay_out(buf[:row_bytes].view(t.dtype).view(row.shape), row)
            yield buf[:row_bytes].numpy()


def _lay_out(dest: torch.Tensor, row: torch.Tensor) -> None:
    """Copy ``row`` into the C-order ``dest``. A 3-D row whose memory is another order of its dimensions (a
    channels-last map stored ``nchw``, or a C-order map stored ``nhwc``) is copied as a 2-D transpose, e.g.
    ``(H*W, C) -> (C, H*W)``, which torch copies in cache-sized blocks: 1.8 CPU-ms for resnet50's 8.8 MB of
    maps per image against 3.4 as a 3-D strided copy (``benchmarks/bench_extract.py --layout``); an
    ``nhwc`` run of the inference path needs neither (its rows are contiguous: a plain copy, 0.4)."""
    if row.dim() == 3 and not row.is_contiguous():
        a, b, c = row.shape
        if row.permute(1, 2, 0).is_contiguous():  # (C, H, W) in (H, W, C) memory
            dest.view(a, b * c).copy_(row.permute(1, 2, 0).reshape(b * c, a).t())
            return
        if row.permute(2, 0, 1).is_contiguous():  # (H, W, C) in (C, H, W) memory
            dest.view(a * b, c).copy_(row.permute(2, 0, 1).reshape(c, a * b).t())
            return
    dest.copy_(row)


# Shards of at least this many bytes are written with O_DIRECT (where the OS and filesystem allow it): from an
# aligned staging buffer straight to the disk, not through the page cache. On this project's 2-core VM a
# buffered write cost 3.1-3.7 CPU-ms per MB written to new files (the guest's page-cache pages are new memory
# to the host), O_DIRECT 0.1-0.3 (README, "Shards written with O_DIRECT"): for unpooled resnet50 (8.8 MB per
# image) that is 27-32 CPU-ms per image against the model's 57-69. Readers are unaffected (same bytes, same file).
DIRECT_MIN_BYTES = 1 << 20
_DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 8 << 20
_staging = threading.local()


def _staging_buffer() -> Tuple[mmap.mmap, torch.Tensor]:
    """This thread's page-aligned staging buffer (anonymous memory, kept: reused by every shard), and a uint8
    tensor on the same memory."""
    buf = getattr(_staging, "buf", None)
    if buf is None:
        buf = _staging.buf = mmap.mmap(-1, _DIRECT_CHUNK)
        _staging.tensor = torch.frombuffer(buf, dtype=torch.uint8)
    return buf, _staging.tensor


class _Staged:
    """Bytes gathered in the staging buffer and written to ``fd`` in whole aligned blocks (O_DIRECT's rule).

    Contiguous tensors are copied in; a channels-last map is laid out in C order one row at a time straight
    into the buffer (one copy per byte, no row buffer) where the row fits and starts at a multiple of its
    element size. What does not fit goes through :func:`_byte_parts`.
    """

    def __init__(self, fd: int, step: Optional[str]):
        self.fd, self.step = fd, step
        buf, self.tensor = _staging_buffer()
        self.view = memoryview(buf)
        self.fill = self.total = 0
        self.first = True

    def _flush(self) -> None:
        """Write the whole blocks gathered; the rest (under one block) moves to the buffer's start."""
        n = self.fill - self.fill % _DIRECT_ALIGN
        view = self.view[:n]
        while view:
            view = view[os.write(self.fd, view):]
        if self.first and self.step:
            fault_point(f"{self.step}.partial")
        self.first = False
        rest = self.fill - n
        self.view[:rest] = self.view[n:self.fill]
        self.fill = rest

    def put_bytes(self, part: Any) -> None:
        src = memoryview(part).cast("B")
        while src:
            k = min(len(src), _DIRECT_CHUNK - self.fill)
            self.view[self.fill:self.fill + k] = src[:k]
            self.fill, self.total, src = self.fill + k, self.total + k, src[k:]
            if self.fill == _DIRECT_CHUNK:
                self._flush()

    def put_tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.numel() == 0:
            return
        size = t.element_size()
        rows = t if t.dim() > 1 else t.reshape(1, -1)
        row_bytes = rows[0].numel() * size
        if t.is_contiguous() or row_bytes + _DIRECT_ALIGN > _DIRECT_CHUNK:
            for part in _byte_parts(b"", {"t": t}):
                self.put_bytes(part)
            return
        for row in rows:
            if self.fill + row_bytes > _DIRECT_CHUNK:
                self._flush()
            if self.fill % size:  # a dtype view needs an aligned start (only after an odd-sized other dtype)
                for part in _byte_parts(b"", {"t": row.unsqueeze(0)}):
                    self.put_bytes(part)
                continue
            _lay_out(self.tensor[self.fill:self.fill + row_bytes].view(t.dtype).view(row.shape), row)
            self.fill += row_bytes
            self.total += row_bytes

    def finish(self) -> None:
        """Write what is left, padded to a whole block, and cut the file to the bytes put."""
        if self.fill:
            padded = self.fill + (-self.fill % _DIRECT_ALIGN)
            self.view[self.fill:padded] = bytes(padded - self.fill)
            self.fill = padded
            self._flush()
        os.ftruncate(self.fd, self.total)

    def release(self) -> None:
        self.view.release()


def _write_direct(tmp: str, head: bytes, tensors: Mapping[str, torch.Tensor], step: Optional[str]) -> bool:
    """Write ``head`` and the ``tensors``' bytes in C order to the empty file ``tmp`` with O_DIRECT, through
    the aligned staging buffer (:class:`_Staged`), the last block padded and the file then truncated to its
    size. False (nothing written) where O_DIRECT is not available: no flag (not Linux), or the filesystem
    refuses it, at open (tmpfs) or at the first write; the caller then writes the file the buffered way."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(tmp, os.O_WRONLY | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    staged = _Staged(fd, step)
    try:
        staged.put_bytes(head)
        for t in tensors.values():
            staged.put_tensor(t)
        staged.finish()
    except OSError as e:
        if e.errno == errno.EINVAL and staged.first:  # refused at the first write (alignment rules): nothing written
            return False
        raise
    finally:
        staged.release()
        os.close(fd)
    return True


# -- reading ------------------------------------------------------------------------------------
@dataclass
class Features:
    """What :func:`load_features` returns.

    ``levels`` maps each feature level's module name (in ``out_indices``
    order) to a tensor whose row ``j`` belongs to ``paths[j]``; ``(N, C, H, W)``
    (channels-last memory where the run stored ``nhwc``, the default: call
    ``.contiguous()`` for C order) or, pooled, ``(N, C)``. Tensors keep the stored dtype (``bfloat16`` has no
    numpy twin; call ``.float().numpy()`` for numpy). ``complete``: every input
    is either a row or in ``skipped`` (else the run was cut short, and the rows
    are those of its finished batches).
    """

    paths: List[str]
    levels: Dict[str, torch.Tensor]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    complete: bool = False


def _damaged(what: str, k: int) -> ExtractError:
    return ExtractError(f"{what}: the features are damaged; run the same extraction again (same command, same -o): "
                        f"it recomputes batch {k} and every batch after it")


def _open_for_reading(out_dir: PathLike) -> Tuple[Path, Dict[str, Any], _IndexState, bool]:
    """Check ``out_dir`` and its index; return it, its meta, its index and whether it is complete.

    Raises :class:`ExtractError` naming the file if anything the index names
    is missing or damaged, or if ``meta.json`` calls the run complete while the
    index lacks inputs: part of the rows is never passed off as all of them.
    A run cut short (a torn last batch, inputs not yet reached) is not damage.
    """
    out = Path(out_dir)
    meta = _read_meta(out)
    layout = _Layout.of(meta["settings"])
    state = _scan_index(out, layout, keep_records=True)
    if state.damage:
        raise _damaged(state.damage, state.done_batches)
    complete = state.done_batches * layout.batch_size >= layout.n_inputs
    status = meta.get("status")
    if not complete and isinstance(status, dict) and status.get("complete"):
        listed = state.rows + state.skipped
        where = out / INDEX if (out / INDEX).is_file() else f"{out / INDEX} (missing)"
        raise _damaged(f"{where} lists {listed} of the {layout.n_inputs} inputs, but {out / META} records the run "
                       f"complete", state.done_batches)
    return out, meta, state, complete


def iter_shards(out_dir: PathLike) -> Iterator[Tuple[List[str], Dict[str, torch.Tensor]]]:
    """Yield ``(paths, {level: tensor})`` per shard, in input order (memory: one shard at a time).

    The directory is checked first, as by :func:`load_features`.
    """
    out, meta, state, _ = _open_for_reading(out_dir)
    yield from _shards(out, meta, state)


def _shards(out: Path, meta: Dict[str, Any], state: _IndexState) -> Iterator[Tuple[List[str], Dict[str, torch.Tensor]]]:
    levels = [lv["key"] for lv in meta["settings"]["levels"]]
    by_shard: Dict[str, List[Dict[str, Any]]] = {}
    for rec in state.records:
        if "shard" in rec:
            by_shard.setdefault(rec["shard"], []).append(rec)
    layout = meta["settings"].get("layout", "nchw")
    for shard, recs in by_shard.items():
        try:
            with safe_open(str(out / shard), framework="pt") as f:
                tensors = {name: from_stored(f.get_tensor(name), layout) for name in levels}
        except (OSError, SafetensorError) as e:  # changed since it was checked
            raise _damaged(f"{out / shard} is unreadable ({e})", int(Path(shard).stem)) from None
        n = tensors[levels[0]].shape[0]
        if n != len(recs) or [r["row"] for r in recs] != list(range(n)):
            raise _damaged(f"{out / shard} has {n} rows but the index names {len(recs)}", int(Path(shard).stem))
        yield [r["path"] for r in recs], tensors


def load_features(out_dir: PathLike) -> Features:
    """Read a whole output directory into memory (the complete batches, when a run was cut short).

    :class:`ExtractError` names the file, and the remedy, when the directory is
    damaged (a shard missing or cut short, an edited ``meta.json``, an index
    short of the inputs of a run recorded complete).
    """
    out, meta, state, complete = _open_for_reading(out_dir)
    levels = [lv["key"] for lv in meta["settings"]["levels"]]
    paths: List[str] = []
    parts: Dict[str, List[torch.Tensor]] = {name: [] for name in levels}
    for shard_paths, tensors in _shards(out, meta, state):
        paths.extend(shard_paths)
        for name in levels:
            parts[name].append(tensors[name])
    dtype = getattr(torch, meta["settings"].get("store_dtype", meta["settings"]["dtype"]))  # as stored
    result = {}
    for lv in meta["settings"]["levels"]:
        name = lv["key"]
        result[name] = torch.cat(parts[name]) if parts[name] else torch.empty((0, *lv["shape"]), dtype=dtype)
    skipped = [(r["path"], r["skipped"]) for r in state.records if "skipped" in r]
    return Features(paths, result, skipped, meta, complete)
