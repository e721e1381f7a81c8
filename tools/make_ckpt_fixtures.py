"""Write the MindSpore checkpoint fixtures used by tests/test_mindspore_ckpt.py.

Run with a Python that has the real MindSpore (tested with 2.10.0); the tests themselves need no
MindSpore, which is the point: the fixtures are ground truth written by MindSpore's own
``save_checkpoint``, and ``expected.npz`` / ``expected.json`` record what each file must decode to.

    python tools/make_ckpt_fixtures.py [--out tests/data/ckpt]

Not produced here: a split tensor. MindSpore 2.10 only splits tensors above 512 MiB
(``serialization.SLICE_SIZE`` is 512 * 1024 KiB), far too big for a fixture; the test builds that
case from the wire format instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

log = logging.getLogger("make_ckpt_fixtures")

ENC_KEY = b"0123456789abcdef"


class TinyNet(nn.Cell):
    """Conv/BN/Dense, so names and shapes look like a real (very small) backbone checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, has_bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Dense(4, 5)

    def construct(self, x):
        return self.fc(self.bn(self.conv(x)).mean(axis=(2, 3)))


def tiny_net(rng: np.random.Generator) -> TinyNet:
    """A TinyNet with seeded random values everywhere, so BN stats are not just zeros and ones."""
    net = TinyNet()
    for param in net.get_parameters():
        values = rng.standard_normal(param.shape).astype(np.float32)
        if "variance" in param.name:
            values = np.abs(values) + 0.5
        param.set_data(Tensor(values))
    return net


def as_entries(arrays: dict[str, np.ndarray], ms_dtype=None) -> list[dict]:
    """save_checkpoint's list-of-dicts form, optionally casting to a MindSpore dtype."""
    return [{"name": k, "data": Tensor(v, ms_dtype) if ms_dtype else Tensor(v)} for k, v in arrays.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/ckpt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    net = tiny_net(rng)
    net_arrays = {p.name: p.asnumpy() for p in net.get_parameters()}
    bf16_arrays = {k: Tensor(v, ms.bfloat16).astype(ms.float32).asnumpy() for k, v in net_arrays.items()}
    dtype_arrays = {
        "f64": rng.standard_normal((2, 3)),
        "i8": rng.integers(-128, 128, (5,), dtype=np.int8),
        "i16": rng.integers(-2**15, 2**15, (2, 2), dtype=np.int16),
        "i32": rng.integers(-2**31, 2**31, (3,), dtype=np.int32),
        "i64": rng.integers(-2**62, 2**62, (2, 1, 2), dtype=np.int64),
        "u8": rng.integers(0, 256, (4,), dtype=np.uint8),
        "u16": rng.integers(0, 2**16, (3,), dtype=np.uint16),
        "flags": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
    }

    # fixture -> (entries for save_checkpoint, save kwargs, expected arrays, expected types, skipped names)
    f32_types = {k: "Float32" for k in net_arrays}
    fixtures = {
        "net_f32": (net, {"append_dict": {"epoch_num": 3}}, {**net_arrays, "epoch_num": np.array(3)},
                    {**f32_types, "epoch_num": "Int64"}, []),
        "net_f16": (as_entries({k: v.astype(np.float16) for k, v in net_arrays.items()}), {},
                    {k: v.astype(np.float16) for k, v in net_arrays.items()},
                    {k: "Float16" for k in net_arrays}, []),
        "net_bf16": (as_entries(net_arrays, ms.bfloat16), {}, bf16_arrays,
                     {k: "BFloat16" for k in net_arrays}, []),
        "net_crc": (net, {"crc_check": True}, net_arrays, f32_types, []),
        "dtypes": (as_entries(dtype_arrays), {"append_dict": {"note": "hello"}}, dtype_arrays,
                   {k: str(Tensor(v).dtype) for k, v in dtype_arrays.items()}, ["note"]),
    }
    for mode in ("AES-GCM", "AES-CBC", "SM4-CBC"):
        name = "enc_" + mode.lower().replace("-", "_")
        fixtures[name] = (as_entries({"w": net_arrays["fc.bias"]}), {"enc_key": ENC_KEY, "enc_mode": mode},
                          None, None, [])

    manifest: dict[str, dict] = {}
    expected: dict[str, np.ndarray] = {}
    for name, (obj, kwargs, arrays, types, skipped) in fixtures.items():
        path = args.out / f"{name}.ckpt"
        if path.exists():
            path.unlink()  # MindSpore leaves its files read-only
        ms.save_checkpoint(obj, str(path), **kwargs)
        os.chmod(path, 0o644)
        if arrays is None:
            manifest[name] = {"encrypted": kwargs["enc_mode"]}
            loaded = ms.load_checkpoint(str(path), dec_key=ENC_KEY, dec_mode=kwargs["enc_mode"])
            assert list(loaded) == ["w"], loaded
        else:
            # "type" is the tensor_type MindSpore wrote; values of BFloat16 entries are stored as float32.
            manifest[name] = {"tensors": [[k, types[k], list(v.shape)] for k, v in arrays.items()],
                              "skipped": skipped}
            expected.update({f"{name}|{k}": v for k, v in arrays.items()})
            loaded = ms.load_checkpoint(str(path), crc_check=kwargs.get("crc_check", False))
            assert list(loaded) == list(arrays) + skipped, (name, list(loaded))
            for k, v in arrays.items():  # MindSpore must agree with what we record as expected
                got = loaded[k]
                got = got.astype(ms.float32) if got.dtype == ms.bfloat16 else got
                assert str(loaded[k].dtype) == types[k] and np.array_equal(got.asnumpy(), v), (name, k)
        log.info("%-12s %6d bytes", path.name, path.stat().st_size)

    np.savez(args.out / "expected.npz", **expected)
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()]
    (args.out / "expected.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    log.info("wrote %d fixtures to %s (%d bytes in all)", len(fixtures), args.out, total)


if __name__ == "__main__":
    main()
    os._exit(0)  # skip MindSpore's noisy interpreter-exit destructors
