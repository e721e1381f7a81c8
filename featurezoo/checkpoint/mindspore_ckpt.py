"""Read and write MindSpore ``.ckpt`` checkpoints without MindSpore or the protobuf package.

MindCV publishes its weights as MindSpore checkpoints. Installing MindSpore (or even the protobuf
runtime plus generated code) just to pull a few hundred tensors out of one file is heavy and
version-fragile, while the schema is tiny, so we decode the protobuf wire format by hand.

Format, as written by MindSpore 2.10 (``mindspore/train/checkpoint_pb2.py``, ``serialization.py``)::

    message Checkpoint {                      // proto2
      message Value {
        required string tag = 1;              // parameter name
        oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; }
      }
      repeated Value value = 1;
    }
    message TensorProto {
      repeated int64 dims = 1;                // written unpacked; no dims = scalar
      required string tensor_type = 2;        // "Float32", "BFloat16", "Int64", "str", ...
      required bytes tensor_content = 3;      // raw C-order little-endian data
    }
    message MapTensorProto { repeated TensorProto tensor = 1; }

* ``save_checkpoint`` serializes one ``Checkpoint`` holding a single ``Value`` per tensor and writes
  them back to back. Concatenated protobuf messages merge, so a file is one long ``repeated Value``.
* A tensor over 512 MiB is written as consecutive ``Value`` records with the same tag, same dims and
  type, each holding the next slice of the raw bytes; the reader joins them.
* ``crc_check=True`` appends a 17-byte trailer ``b"crc_num" + crc32(all bytes before).to_bytes(10, "big")``.
* ``enc_key=...`` encrypts the stream in blocks, each starting with the 4 bytes ``d8|d9|da 5e 3a 7f``
  (magic 0x7F3A5ED8 + mode, little-endian) for AES-GCM / AES-CBC / SM4-CBC.
* ``append_dict`` strings are stored with ``tensor_type "str"``, dims ``[0]`` and UTF-32 content;
  they are not tensors, so the reader skips them. MindSpore < 2.0 stored scalars with dims ``[0]``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch

from featurezoo.atomic import atomic_write
from featurezoo.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_mindspore_ckpt", "write_mindspore_ckpt"]

# MindSpore's tensor_type strings (serialization.tensor_to_ms_type) that have a torch equivalent.
_TYPE_TO_TORCH: dict[str, torch.dtype] = {
    "Float16": torch.float16, "BFloat16": torch.bfloat16, "Float32": torch.float32,
    "Float64": torch.float64, "Int8": torch.int8, "Int16": torch.int16, "Int32": torch.int32,
    "Int64": torch.int64, "UInt8": torch.uint8, "UInt16": torch.uint16, "UInt32": torch.uint32,
    "UInt64": torch.uint64, "Bool": torch.bool,
}
_TORCH_TO_TYPE = {dtype: name for name, dtype in _TYPE_TO_TORCH.items()}

_CRC_MARK = b"crc_num"
_CRC_TRAILER = len(_CRC_MARK) + 10
_ENCRYPTED_MAGIC = {b"\xd8\x5e\x3a\x7f": "AES-GCM", b"\xd9\x5e\x3a\x7f": "AES-CBC",
                    b"\xda\x5e\x3a\x7f": "SM4-CBC"}
# Leading bytes of formats people mistake for a .ckpt, to make the error message useful.
_FOREIGN_MAGIC = {b"PK\x03\x04": "a zip archive (PyTorch .pt/.pth?)", b"\x80": "a Python pickle",
                  b"\x89HDF": "an HDF5 file (Keras .h5?)"}
# Slice size MindSpore uses for big tensors (serialization.SLICE_SIZE is 512 * 1024 KiB).
_SPLIT_BYTES = 512 * 1024 * 1024

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types


class _WireError(Exception):
    """Malformed protobuf; turned into a CheckpointError that names the file."""


class _Record(NamedTuple):
    """One ``Checkpoint.Value``: a whole tensor or one slice of a split tensor."""

    tag: str
    offset: int
    tensor_type: str | None = None  # None for map tensors
    dims: tuple[int, ...] = ()
    content: memoryview | None = None


# ----------------------------------------------------------------------------- wire format


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; return (value, position after it)."""
    start, result, shift = pos, 0, 0
    while True:
        if pos >= end:
            raise _WireError(f"truncated: a varint at byte {start} runs past the end of the data")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError(f"corrupt varint at byte {start} (longer than 10 bytes)")


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int | slice, int]]:
    """Yield ``(field number, wire type, value, offset)`` for the message in ``buf[pos:end]``.

    Length-delimited values come back as a ``slice`` of ``buf`` so offsets stay file-absolute,
    which makes error messages point at the right byte and avoids copying tensor data.
    """
    while pos < end:
        at = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _WireError(f"invalid field number 0 at byte {at}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _WireError(f"truncated: field {field} at byte {at} declares {length} bytes "
                                 f"but only {end - pos} remain")
            value, pos = slice(pos, pos + length), pos + length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if size > end - pos:
                raise _WireError(f"truncated: fixed-width field {field} at byte {at} runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        else:
            raise _WireError(f"unsupported wire type {wire} for field {field} at byte {at}")
        yield field, wire, value, at


def _text(buf: memoryview, where: slice, what: str) -> str:
    try:
        return str(buf[where], "utf-8")
    except UnicodeDecodeError:
        raise _WireError(f"{what} at byte {where.start} is not valid UTF-8") from None


def _int64(value: int) -> int:
    """Reinterpret a varint as a signed int64 (negative dims would be 10-byte varints)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_tensor(buf: memoryview, where: slice) -> tuple[str, tuple[int, ...], memoryview]:
    dims: list[int] = []
    tensor_type = content = None
    for field, wire, value, at in _fields(buf, where.start, where.stop):
        if field == 1 and wire == _VARINT:
            dims.append(_int64(value))
        elif field == 1 and wire == _LEN:  # packed dims: legal protobuf, never written by MindSpore
            pos = value.start
            while pos < value.stop:
                dim, pos = _varint(buf, pos, value.stop)
                dims.append(_int64(dim))
        elif field == 2 and wire == _LEN:
            tensor_type = _text(buf, value, "tensor_type")
        elif field == 3 and wire == _LEN:
            content = buf[value]
        elif field in (1, 2, 3):
            raise _WireError(f"TensorProto field {field} at byte {at} has wrong wire type {wire}")
    if tensor_type is None or content is None:
        raise _WireError(f"TensorProto at byte {where.start} lacks tensor_type or tensor_content")
    return tensor_type, tuple(dims), content


def _records(buf: memoryview, end: int) -> Iterator[_Record]:
    """Yield every ``Checkpoint.Value`` in ``buf[:end]``, in file order."""
    for field, wire, value, at in _fields(buf, 0, end):
        if field != 1 or wire != _LEN:
            raise _WireError(f"unexpected top-level field {field} (wire type {wire}) at byte {at}; "
                             "a checkpoint holds only Value records")
        tag = tensor = None
        is_map = False
        for vfield, vwire, vvalue, vat in _fields(buf, value.start, value.stop):
            if vfield in (1, 2, 3) and vwire != _LEN:
                raise _WireError(f"Value field {vfield} at byte {vat} has wrong wire type {vwire}")
            if vfield == 1:
                tag = _text(buf, vvalue, "tag")
            elif vfield == 2:
                tensor, is_map = _parse_tensor(buf, vvalue), False
            elif vfield == 3:
                tensor, is_map = None, True
        if tag is None:
            raise _WireError(f"Value at byte {at} has no tag (parameter name)")
        if tensor is None and not is_map:
            raise _WireError(f"Value {tag!r} at byte {at} holds neither a tensor nor a map tensor")
        yield _Record(tag, at) if is_map else _Record(tag, at, *tensor)


# ----------------------------------------------------------------------------- reading


def _read_bytes(path: str) -> bytes:
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a MindSpore .ckpt file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from e
    if not data:
        raise CheckpointError(f"{path} is empty (0 bytes); it is not a MindSpore checkpoint")
    return data


def _to_tensor(path: str, pieces: list[_Record]) -> torch.Tensor | None:
    """Join a tensor's pieces and convert to torch; None for entries that are not tensors."""
    first = pieces[0]
    if any((p.tensor_type, p.dims) != (first.tensor_type, first.dims) for p in pieces):
        raise CheckpointError(f"{path}: the {len(pieces)} split pieces of tensor {first.tag!r} "
                              "disagree on dims or tensor_type")
    if first.tensor_type == "str":
        logger.warning("%s: skipping %r, a string entry (append_dict), not a tensor", path, first.tag)
        return None
    dtype = _TYPE_TO_TORCH.get(first.tensor_type)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {first.tag!r} has tensor_type {first.tensor_type!r}, "
                              f"which is not supported (supported: {', '.join(_TYPE_TO_TORCH)})")
    content = pieces[0].content if len(pieces) == 1 else bytearray().join(p.content for p in pieces)
    dims = list(first.dims)
    if dims == [0] and len(content) == dtype.itemsize:
        dims = []  # MindSpore < 2.0 wrote scalars with dims [0]
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{path}: tensor {first.tag!r} has negative dims {dims}")
    expected = math.prod(dims) * dtype.itemsize
    if len(content) != expected:
        raise CheckpointError(
            f"{path}: tensor {first.tag!r} ({first.tensor_type}, shape {tuple(dims)}) needs "
            f"{expected} bytes but its tensor_content holds {len(content)}; the file is corrupt")
    if expected == 0:
        return torch.empty(dims, dtype=dtype)
    # bytearray copies the data out of the file buffer, so the tensor owns writable memory.
    # MindSpore writes the host's native order, which is little-endian on every supported platform.
    return torch.frombuffer(bytearray(content), dtype=dtype).reshape(dims)


def read_mindspore_ckpt(path: str | os.PathLike[str], *, verify_crc: bool = True) -> dict[str, torch.Tensor]:
    """Load every tensor of a MindSpore ``.ckpt`` file, in file order, as CPU torch tensors.

    Split tensors are reassembled, a CRC trailer is checked (``verify_crc``), and entries that have
    no torch form (map tensors, ``append_dict`` strings) are skipped with a warning. Raises
    ``CheckpointError`` naming the file for anything unreadable, including encrypted checkpoints.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    mode = _ENCRYPTED_MAGIC.get(data[:4])
    if mode is not None:
        raise CheckpointError(
            f"{path} is an encrypted MindSpore checkpoint ({mode}); encrypted checkpoints are not "
            "supported; decrypt it with MindSpore first: load_checkpoint(path, dec_key=..., "
            f"dec_mode={mode!r}), then save_checkpoint(...) without enc_key")
    end = len(data)
    if data[-_CRC_TRAILER:-10] == _CRC_MARK:
        end -= _CRC_TRAILER
        stored = int.from_bytes(data[-10:], "big")
        if verify_crc and (actual := zlib.crc32(memoryview(data)[:end])) != stored:
            raise CheckpointError(f"{path}: CRC32 check failed (stored {stored:#010x}, computed "
                                  f"{actual:#010x}); the file is corrupt")
    out: dict[str, torch.Tensor] = {}
    try:
        # MindSpore groups consecutive records with the same tag into one tensor; so do we.
        for tag, group in itertools.groupby(_records(memoryview(data), end), key=lambda r: r.tag):
            pieces = list(group)
            if any(p.tensor_type is None for p in pieces):
                logger.warning("%s: skipping map tensor %r (not supported)", path, tag)
                continue
            tensor = _to_tensor(path, pieces)
            if tensor is None:
                continue
            if tag in out:
                logger.warning("%s: tensor %r appears twice; keeping the later one, as MindSpore does",
                               path, tag)
            out[tag] = tensor
    except _WireError as e:
        hint = next((f"; it looks like {kind}" for magic, kind in _FOREIGN_MAGIC.items()
                     if data.startswith(magic)), "")
        raise CheckpointError(f"{path} is not a readable MindSpore checkpoint ({e}){hint}") from None
    if not out:
        logger.warning("%s: checkpoint holds no tensors", path)
    return out


# ----------------------------------------------------------------------------- writing


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_prefix(field: int, length: int) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(length)


def _as_tensor(name: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.from_numpy rejects
            return torch.from_numpy(np.ascontiguousarray(value).view(np.uint16)).view(torch.bfloat16)
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name!r}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in _TORCH_TO_TYPE:
        raise TypeError(f"{name!r}: dtype {value.dtype} cannot be stored in a MindSpore checkpoint")
    return value.detach().cpu()


def _encode_entry(name: str, value: torch.Tensor | np.ndarray) -> Iterator[bytes | memoryview]:
    """Serialize one tensor exactly as MindSpore does: one Checkpoint message per <=512 MiB slice."""
    if not isinstance(name, str):
        raise TypeError(f"checkpoint keys must be str, got {type(name).__name__}")
    tensor = _as_tensor(name, value)
    raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    type_name = _TORCH_TO_TYPE[tensor.dtype].encode()
    head = b"".join(_encode_varint(1 << 3 | _VARINT) + _encode_varint(d) for d in tensor.shape)
    head += _len_prefix(2, len(type_name)) + type_name
    tag = name.encode()
    for start in range(0, max(len(raw), 1), _SPLIT_BYTES):
        content = raw[start:start + _SPLIT_BYTES]
        tensor_msg = head + _len_prefix(3, len(content))
        value_head = _len_prefix(1, len(tag)) + tag + _len_prefix(2, len(tensor_msg) + len(content))
        yield _len_prefix(1, len(value_head) + len(tensor_msg) + len(content)) + value_head + tensor_msg
        yield content


def write_mindspore_ckpt(state_dict: Mapping[str, torch.Tensor | np.ndarray],
                         path: str | os.PathLike[str], *, crc: bool = False) -> None:
    """Write tensors as a MindSpore ``.ckpt`` that ``mindspore.load_checkpoint`` reads back unchanged.

    The file is written with :func:`featurezoo.atomic.atomic_write`, so a crash or a bad entry
    never leaves a half-written checkpoint at ``path``. ``crc=True`` adds MindSpore's CRC trailer.
    """
    with atomic_write(path) as f:
        checksum = 0
        for name, value in state_dict.items():
            for chunk in _encode_entry(name, value):
                f.write(chunk)
                if crc:
                    checksum = zlib.crc32(chunk, checksum)
        if crc:
            f.write(_CRC_MARK + checksum.to_bytes(10, "big"))
    logger.debug("wrote %d tensors to %s", len(state_dict), path)
