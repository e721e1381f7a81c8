"""Tests for the MindSpore-free .ckpt reader/writer.

Fixtures in tests/data/ckpt were written by the real ``mindspore.save_checkpoint`` (see
tools/make_ckpt_fixtures.py); expected.json/expected.npz hold what each must decode to. Cases
MindSpore cannot be made to write at fixture size (split tensors, packed dims, map tensors,
corrupt lengths) are built here from the protobuf wire format with a tiny independent encoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from featurezoo.checkpoint import mindspore_ckpt
from featurezoo.checkpoint.mindspore_ckpt import CheckpointError, read_mindspore_ckpt, write_mindspore_ckpt

DATA = Path(__file__).parent / "data" / "ckpt"
MANIFEST = json.loads((DATA / "expected.json").read_text())
PLAIN = [name for name, entry in MANIFEST.items() if "tensors" in entry]
ENCRYPTED = [name for name, entry in MANIFEST.items() if "encrypted" in entry]
TORCH_DTYPE = {"Float16": torch.float16, "BFloat16": torch.bfloat16, "Float32": torch.float32,
               "Float64": torch.float64, "Int8": torch.int8, "Int16": torch.int16, "Int32": torch.int32,
               "Int64": torch.int64, "UInt8": torch.uint8, "UInt16": torch.uint16, "Bool": torch.bool}


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(DATA / "expected.npz") as npz:
        return {key: npz[key] for key in npz.files}


# --- independent protobuf encoder for hand-built files -------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _value(tag: str, dims: list[int], tensor_type: str, content: bytes, packed: bool = False) -> bytes:
    """One serialized ``Checkpoint{ value { tag, tensor {dims, tensor_type, tensor_content} } }``."""
    if packed:
        dims_wire = _len_field(1, b"".join(_varint(d) for d in dims)) if dims else b""
    else:
        dims_wire = b"".join(_varint(1 << 3) + _varint(d) for d in dims)
    tensor = dims_wire + _len_field(2, tensor_type.encode()) + _len_field(3, content)
    return _len_field(1, _len_field(1, tag.encode()) + _len_field(2, tensor))


def _write(tmp_path: Path, data: bytes, name: str = "hand.ckpt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


# --- fixtures written by real MindSpore ----------------------------------------------------------

@pytest.mark.parametrize("fixture", PLAIN)
def test_reads_mindspore_fixture_exactly(fixture: str, expected: dict[str, np.ndarray], caplog) -> None:
    entry = MANIFEST[fixture]
    with caplog.at_level(logging.WARNING):
        got = read_mindspore_ckpt(DATA / f"{fixture}.ckpt")
    assert list(got) == [name for name, _, _ in entry["tensors"]]
    for name, tensor_type, shape in entry["tensors"]:
        tensor, want = got[name], expected[f"{fixture}|{name}"]
        assert tensor.dtype == TORCH_DTYPE[tensor_type], name
        assert list(tensor.shape) == shape, name
        if tensor.dtype == torch.bfloat16:  # expected values are stored as (exact) float32
            tensor = tensor.float()
        assert torch.equal(tensor, torch.from_numpy(want)), name
    for skipped in entry["skipped"]:  # append_dict strings are not tensors
        assert any(skipped in r.getMessage() for r in caplog.records)


def test_crc_is_verified(tmp_path: Path) -> None:
    data = bytearray((DATA / "net_crc.ckpt").read_bytes())
    assert data[-17:-10] == b"crc_num"
    data[len(data) // 2] ^= 0x01  # flip a bit inside tensor data
    path = _write(tmp_path, bytes(data))
    with pytest.raises(CheckpointError, match="CRC32 check failed") as err:
        read_mindspore_ckpt(path)
    assert str(path) in str(err.value)
    assert len(read_mindspore_ckpt(path, verify_crc=False)) == len(MANIFEST["net_crc"]["tensors"])


@pytest.mark.parametrize("fixture, crc", [("net_f32", False), ("net_f16", False), ("net_crc", True)])
def test_writer_is_byte_identical_to_mindspore(fixture: str, crc: bool, expected, tmp_path: Path) -> None:
    """Same bytes as save_checkpoint is the strongest evidence that MindSpore reads our files."""
    state = {name: torch.from_numpy(expected[f"{fixture}|{name}"]) for name, _, _ in MANIFEST[fixture]["tensors"]}
    out = tmp_path / "ours.ckpt"
    write_mindspore_ckpt(state, out, crc=crc)
    assert out.read_bytes() == (DATA / f"{fixture}.ckpt").read_bytes()


# --- round trips ---------------------------------------------------------------------------------

def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g)
    return {
        "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double()[0],
        "i8": torch.randint(-128, 128, (7,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-2**15, 2**15, (2, 3), dtype=torch.int16, generator=g),
        "i32": torch.randint(-2**31, 2**31, (4,), dtype=torch.int32, generator=g),
        "i64": torch.tensor([-2**63, 2**63 - 1, 0]),
        "u8": torch.arange(256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "strided": x.transpose(0, 2)[::2],
    }


@pytest.mark.parametrize("crc", [False, True])
def test_round_trip(crc: bool, tmp_path: Path) -> None:
    state = _all_dtypes()
    write_mindspore_ckpt(state, tmp_path / "rt.ckpt", crc=crc)
    _assert_same(read_mindspore_ckpt(tmp_path / "rt.ckpt"), state)


def test_writer_accepts_numpy_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "np.ckpt"
    path.write_bytes(b"old")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=">i4")}
    write_mindspore_ckpt(arrays, path)
    _assert_same(read_mindspore_ckpt(path), {k: torch.from_numpy(v.astype(v.dtype.newbyteorder("=")))
                                             for k, v in arrays.items()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["np.ckpt"]  # no temp file left behind


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "keep.ckpt"
    path.write_bytes(b"old")
    with pytest.raises(TypeError, match="complex"):
        write_mindspore_ckpt({"ok": torch.ones(3), "bad": torch.ones(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.ckpt"]


def test_writer_splits_big_tensors_like_mindspore(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mindspore_ckpt, "_SPLIT_BYTES", 64)  # stands in for MindSpore's 512 MiB
    state = {"big": torch.arange(50, dtype=torch.float32).reshape(5, 10), "small": torch.ones(2)}
    path = tmp_path / "split.ckpt"
    write_mindspore_ckpt(state, path)
    data = path.read_bytes()
    tags = [r.tag for r in mindspore_ckpt._records(memoryview(data), len(data))]
    assert tags == ["big"] * 4 + ["small"]  # 200 bytes -> 64 + 64 + 64 + 8
    _assert_same(read_mindspore_ckpt(path), state)


# --- wire-format cases built by hand -------------------------------------------------------------

def test_split_values_are_joined(tmp_path: Path) -> None:
    """MindSpore writes a >512 MiB tensor as consecutive Values sharing tag, dims and type."""
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    pieces = np.array_split(full, 3)  # uneven row slices, as serialization._write_parameter_data does
    data = b"".join(_value("w", [4, 6], "Float32", p.tobytes()) for p in pieces)
    data += _value("b", [2], "Int32", np.array([7, 8], np.int32).tobytes())
    got = read_mindspore_ckpt(_write(tmp_path, data))
    _assert_same(got, {"w": torch.from_numpy(full), "b": torch.tensor([7, 8], dtype=torch.int32)})


def test_packed_dims_and_legacy_scalar(tmp_path: Path) -> None:
    data = (_value("packed", [2, 2], "Float16", np.ones(4, np.float16).tobytes(), packed=True)
            + _value("old_scalar", [0], "Float32", np.float32(2.0).tobytes())  # MindSpore 1.x scalars
            + _value("zero_len", [0], "Float32", b""))
    got = read_mindspore_ckpt(_write(tmp_path, data))
    _assert_same(got, {"packed": torch.ones(2, 2, dtype=torch.float16), "old_scalar": torch.tensor(2.0),
                       "zero_len": torch.zeros(0)})


def test_map_tensor_is_skipped_with_warning(tmp_path: Path, caplog) -> None:
    map_value = _len_field(1, _len_field(1, b"table") + _len_field(3, _len_field(1, b"")))
    data = map_value + _value("w", [1], "Float32", np.float32(1).tobytes())
    with caplog.at_level(logging.WARNING):
        got = read_mindspore_ckpt(_write(tmp_path, data))
    assert list(got) == ["w"]
    assert any("map tensor 'table'" in r.getMessage() for r in caplog.records)


# --- errors --------------------------------------------------------------------------------------

def _error(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        read_mindspore_ckpt(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    _error(tmp_path / "nope.ckpt", "not found")


def test_directory(tmp_path: Path) -> None:
    _error(tmp_path, "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    _error(_write(tmp_path, b""), "empty")


def test_truncated_file(tmp_path: Path) -> None:
    data = (DATA / "net_f32.ckpt").read_bytes()
    _error(_write(tmp_path, data[: len(data) // 2]), "truncated")


def test_every_cut_point_errors_cleanly_or_yields_a_prefix(tmp_path: Path) -> None:
    """A cut at a record boundary is a valid shorter checkpoint; anywhere else must be CheckpointError."""
    data = (DATA / "net_f32.ckpt").read_bytes()
    names = [n for n, _, _ in MANIFEST["net_f32"]["tensors"]]
    path = tmp_path / "cut.ckpt"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        try:
            got = read_mindspore_ckpt(path)
        except CheckpointError:
            continue
        assert list(got) == names[: len(got)], cut


def test_random_bytes(tmp_path: Path) -> None:
    junk = np.random.default_rng(1).bytes(4096)
    _error(_write(tmp_path, junk), "not a readable MindSpore checkpoint")
    message = _error(_write(tmp_path, b"PK\x03\x04" + junk, "model.pth"), "not a readable MindSpore")
    assert "zip" in message


@pytest.mark.parametrize("fixture", ENCRYPTED)
def test_encrypted(fixture: str) -> None:
    message = _error(DATA / f"{fixture}.ckpt", "encrypted.*not supported; decrypt it with MindSpore first")
    assert MANIFEST[fixture]["encrypted"] in message


def test_tensor_length_mismatch(tmp_path: Path) -> None:
    data = _value("conv.weight", [2, 3], "Float32", bytes(20))
    message = _error(_write(tmp_path, data), "'conv.weight'")
    assert "24 bytes" in message and "20" in message


def test_unknown_tensor_type(tmp_path: Path) -> None:
    data = _value("q", [2], "Int4", bytes(1))
    _error(_write(tmp_path, data), "tensor_type 'Int4'")


def test_split_pieces_must_agree(tmp_path: Path) -> None:
    data = _value("w", [2], "Float32", bytes(4)) + _value("w", [3], "Float32", bytes(8))
    _error(_write(tmp_path, data), "split pieces")
