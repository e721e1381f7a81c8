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
the destination is left as it was.

Layer: the bottom one; this module imports nothing from featurezoo.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from typing import IO, Any, Iterator, Optional, Union

__all__ = ["atomic_write", "atomic_path", "write_bytes_atomic", "write_json_atomic", "fsync_dir"]

PathLike = Union[str, "os.PathLike[str]"]

_MODES = ("wb", "w", "wt")
_TEMP_SUFFIX = ".tmp"


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
                 buffering: int = -1) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the block ends without error.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text; ``encoding`` defaults to
    UTF-8). ``buffering`` is passed to ``open`` (``0`` gives raw, unbuffered
    binary writes). See the module docstring for the guarantees.

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
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Like :func:`atomic_write`, for writers that take a file name (``safetensors.torch.save_file``).

    Yields the temporary file's path (the file exists, empty); whatever is
    written there replaces ``path`` when the block ends without error.
    """
    final, directory, base = _split(path)
    fd, tmp = _create_temp(final, directory, base)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(directory)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = 1) -> None:
    """Replace ``path`` with ``obj`` as JSON (plus a final newline), atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
