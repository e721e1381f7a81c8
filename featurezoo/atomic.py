"""Atomic file writes: a reader sees the old file or the new one, never a part.

Every writer in featurezoo (checkpoints, the download cache, MindSpore
``.ckpt`` files, the extraction store's shards and JSON files) goes through
:func:`atomic_write` or :func:`atomic_path`:

1. the data goes to a new temporary file in the destination's folder
   (``.NAME.RANDOM.tmp``, permissions from the umask, as ``open`` gives);
2. the temporary file is flushed and ``fsync``-ed;
3. it is renamed onto the destination with ``os.replace`` (atomic on POSIX
   and Windows when both are on one file system, hence the same folder);
4. the folder is ``fsync``-ed, so the rename itself survives a power loss.

If the writing raises (or is interrupted), the temporary file is removed and
the destination is left as it was. A process killed (SIGKILL, power loss)
mid-write leaves its temporary file behind: :func:`is_temp_name` tells a
writer that finds one that it is garbage of its own.

Fault injection (test-only): with ``FEATUREZOO_FAULT=STEP:N`` in the
environment, the process SIGKILLs itself the ``N``-th time (from 1) it reaches
the point named ``STEP`` (:func:`fault_point`). A write given ``step="meta"``
passes three points: ``meta.begin`` (empty temporary file created),
``meta.data`` (data written and fsynced, not renamed) and ``meta.rename``
(renamed, folder not yet fsynced). The extraction store names the rest
(:mod:`featurezoo.extract.store`). Unset, it costs one dictionary lookup per
point; no user has a reason to set it.

Layer: the bottom one; this module imports nothing from featurezoo.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import threading
from typing import IO, Any, Iterator, Optional, Union

__all__ = ["atomic_write", "atomic_path", "write_bytes_atomic", "write_json_atomic", "fsync_dir", "is_temp_name",
           "fault_point", "FAULT_ENV"]

PathLike = Union[str, "os.PathLike[str]"]

_MODES = ("wb", "w", "wt")
_TEMP_SUFFIX = ".tmp"
_TEMP_HEX = 8  # secrets.token_hex(4)

FAULT_ENV = "FEATUREZOO_FAULT"
_fault_counts: dict = {}
_fault_lock = threading.Lock()


def fault_point(step: str) -> None:
    """Test-only: SIGKILL this process at the ``N``-th pass here if ``FEATUREZOO_FAULT`` is ``STEP:N``.

    A malformed value is a ``ValueError`` at the first point reached, so that a
    test cannot silently inject nothing.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, sep, count = spec.rpartition(":")
    if not sep or not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r} is not valid: use STEP:N with N >= 1 (e.g. meta.data:1)")
    if name != step:
        return
    with _fault_lock:
        _fault_counts[step] = seen = _fault_counts.get(step, 0) + 1
    if seen == int(count):
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # where there is no SIGKILL: as abrupt (no cleanup, no flush)


def is_temp_name(name: str, base: Optional[str] = None) -> bool:
    """Whether the file name ``name`` is a temporary file of :func:`atomic_write` (of ``base``, if given)."""
    if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
        return False
    stem = name[1:-len(_TEMP_SUFFIX)]
    target, dot, token = stem.rpartition(".")
    if not dot or not target or len(token) != _TEMP_HEX or any(c not in "0123456789abcdef" for c in token):
        return False
    return base is None or target == base


def fsync_dir(directory: PathLike) -> None:
    """Make a rename or creation in ``directory`` durable (no-op where folders cannot be opened)."""
    if os.name == "nt":  # Windows cannot open a folder as a file; NTFS journals renames itself
        return
    fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (certain network mounts) do not support it on folders
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _split(path: PathLike):
    final = os.fspath(path)
    if not final or final.endswith(("/", os.sep)):
        raise ValueError(f"cannot write to {final!r}: not a file name")
    return final, os.path.dirname(os.path.abspath(final)), os.path.basename(final)


def _create_temp(final: str, directory: str, base: str):
    """Create a new, empty temporary file next to ``final``; return ``(fd, temp path)``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp  # 0o666 less the umask, as open() would create it
        except FileExistsError:
            continue
        except OSError as e:  # name the file the caller asked for, not our temporary one
            raise type(e)(e.errno, e.strerror, final) from None
    raise FileExistsError(errno.EEXIST, "could not find a free temporary name beside", final)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: Optional[str] = None,
                 buffering: int = -1, step: Optional[str] = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the block ends without error.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text; ``encoding`` defaults to
    UTF-8). ``buffering`` is passed to ``open`` (``0`` gives raw, unbuffered
    binary writes). ``step`` names the write's fault-injection points (test-only;
    see the module docstring). See the module docstring for the guarantees.

    >>> with atomic_write("weights.bin") as f:   # doctest: +SKIP
    ...     f.write(data)
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_write mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    final, directory, base = _split(path)
    fd, tmp = _create_temp(final, directory, base)
    try:
        f = os.fdopen(fd, mode, buffering=buffering, encoding=encoding)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    try:
        with f:
            if step:
                fault_point(f"{step}.begin")
            yield f
            f.flush()
            os.fsync(f.fileno())
        if step:
            fault_point(f"{step}.data")
        os.replace(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise
    if step:
        fault_point(f"{step}.rename")
    fsync_dir(directory)


@contextlib.contextmanager
def atomic_path(path: PathLike, step: Optional[str] = None) -> Iterator[str]:
    """Like :func:`atomic_write`, for writers that take a file name (``safetensors.torch.save_file``).

    Yields the temporary file's path (the file exists, empty); whatever is
    written there replaces ``path`` when the block ends without error.
    """
    final, directory, base = _split(path)
    fd, tmp = _create_temp(final, directory, base)
    os.close(fd)
    try:
        if step:
            fault_point(f"{step}.begin")
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if step:
            fault_point(f"{step}.data")
        os.replace(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise
    if step:
        fault_point(f"{step}.rename")
    fsync_dir(directory)


def write_bytes_atomic(path: PathLike, data: bytes, step: Optional[str] = None) -> None:
    """Replace ``path`` with ``data``, atomically."""
    with atomic_write(path, "wb", step=step) as f:
        f.write(data)


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = 1, step: Optional[str] = None) -> None:
    """Replace ``path`` with ``obj`` as JSON (plus a final newline), atomically."""
    with atomic_write(path, "w", step=step) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
