"""The built-in model zoo as the tests see it, and the MindCV reference jobs.

``python -m tests.zoo jobs`` prints the reference jobs (JSON) that ``make refs``
hands to ``tools/mindcv_reference.py``.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List

import featurezoo as fz

PARITY_SIZE = 64
# MindCV models that need a larger input to run at all (their own constraints).
PARITY_SIZE_OVERRIDES: Dict[str, int] = {
    "inception_v3": 128,  # unpadded stride-2 layers: MindCV needs >= 75 px (64 px shrinks to 0x0)
    "inception_v4": 128,  # unpadded stride-2 layers: MindCV needs >= 75 px (64 px shrinks to 0x0)
}
# MindCV's HRModule rounds every upsampled term to float16 before the fusion add; an
# implementation not bit-identical to MindSpore's CPU kernels lands ~6 in 4096 values on
# the other side of a float16 step, one float16 ulp (~1.4e-4 of max|ref|) on branch features.
PARITY_RTOL_OVERRIDES: Dict[str, float] = {"hrnet_w32": 2e-4, "hrnet_w48": 2e-4}
# Models MindCV cannot run on this machine: the parity test asserts that the
# reference really records MindCV's failure (so nothing is skipped silently) and
# the named test checks the model another way.
PARITY_EXCEPTIONS: Dict[str, str] = {}
# Models above this many parameters are shape-checked on the meta device only
# (parity still runs them for real, once).
META_ONLY_PARAMS = 150_000_000


def zoo_models() -> List[str]:
    """Every model registered by featurezoo itself (not by user code in tests)."""
    return [n for n in fz.list_models() if fz.model_entrypoint(n).__module__.startswith("featurezoo.models.")]


def parity_size(name: str) -> int:
    return PARITY_SIZE_OVERRIDES.get(name, PARITY_SIZE)


def jobs() -> List[dict]:
    return [{"model": n, "size": parity_size(n), "batch": 2} for n in zoo_models()]


if __name__ == "__main__":
    if sys.argv[1:] != ["jobs"]:
        sys.exit("usage: python -m tests.zoo jobs")
    json.dump(jobs(), sys.stdout, indent=1)
