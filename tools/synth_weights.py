"""Reference weights that both environments can regenerate: a 2.6 GB checkpoint kept as a few numbers.

The MindCV reference tool (MindSpore venv, numpy 1.x) replaces each large trainable float32 parameter of the net
by values drawn from a *recipe* -- the mean, standard deviation and range of the values it replaces -- before it
runs the forward pass. The recipe goes into ``meta.json``; the small parameters go into ``weights.npz``. The
tests (PyTorch venv, numpy 2.x) rebuild the exact same checkpoint from the two, so the MindSpore checkpoint of a
large model need not be kept on disk (the reference cache went from 52 GB of ``.ckpt`` files to a few).

Only numpy is used, and only operations whose results numpy fixes bit for bit: PCG64's raw 64-bit stream (its
bit generator, seeded through ``SeedSequence``, is stable across numpy versions; its distributions are not
promised to be) and IEEE-rounded elementwise float64 arithmetic. The values are uniform with the recipe's mean
and standard deviation, clipped to the recipe's range (so a positive parameter stays positive).
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, Sequence

import numpy as np

# Parameters with at least this many float32 elements are synthesised; smaller ones are stored as they are.
MIN_NUMEL = 65536
# A MindSpore checkpoint under this many bytes is kept as written, so that MindSpore's own files stay under test.
KEEP_CKPT_BYTES = 50_000_000

_SQRT3 = math.sqrt(3.0)


def recipe_of(values: np.ndarray) -> Dict[str, float]:
    """The four numbers that stand for ``values``: mean, standard deviation, minimum and maximum."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "lo": float(v.min()), "hi": float(v.max())}


def _stream_seed(name: str, seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])


def synthesise(name: str, shape: Sequence[int], recipe: Dict[str, float], seed: int) -> np.ndarray:
    """The float32 values of parameter ``name``: uniform with the recipe's mean and std, clipped to its range."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.random.PCG64(_stream_seed(name, seed)).random_raw(n)
    u = (raw >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)  # [0, 1), exact
    half_width = float(recipe["std"]) * _SQRT3
    v = (u * 2.0 - 1.0) * half_width + float(recipe["mean"])
    np.clip(v, float(recipe["lo"]), float(recipe["hi"]), out=v)
    return v.astype(np.float32).reshape(tuple(int(d) for d in shape))


def needs_recipe(dtype_name: str, shape: Sequence[int]) -> bool:
    return dtype_name == "float32" and int(np.prod(shape, dtype=np.int64)) >= MIN_NUMEL
