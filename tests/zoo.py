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
    "halonet_50t": 256,  # halo attention needs every stage map divisible by 8: sides 256k-7..256k px
    "repmlp_t224": 224,  # fc3 weights fix the partition: sides 224k..224k+3 px only
    "repmlp_b224": 224,  # fc3 weights fix the partition: sides 224k..224k+3 px only
    "repmlp_t256": 256,  # fc3 weights fix the partition: sides 256k..256k+3 px only
    "repmlp_b256": 256,  # fc3 weights fix the partition: sides 256k..256k+3 px only
    "repmlp_d256": 256,  # fc3 weights fix the partition: sides 256k..256k+3 px only
    "repmlp_l256": 256,  # fc3 weights fix the partition: sides 256k..256k+3 px only
    "vgg11": 224,  # the classifier flattens a 7x7 map: 224..255 px only
    "vgg13": 224,  # the classifier flattens a 7x7 map: 224..255 px only
    "vgg16": 224,  # the classifier flattens a 7x7 map: 224..255 px only
    "vgg19": 224,  # the classifier flattens a 7x7 map: 224..255 px only
}
# MindCV's HRModule rounds every upsampled term to float16 before the fusion add; an
# implementation not bit-identical to MindSpore's CPU kernels lands ~6 in 4096 values on
# the other side of a float16 step, one float16 ulp (~1.4e-4 of max|ref|) on branch features.
# The deepest nets amplify float32 rounding beyond 1e-4 of max|ref| even in MindCV itself,
# measured against a float64 run of the same weights: resnest269 1.8e-4 (random BN; ours
# 2.3e-4, resnest200 1.4e-4, varying with thread count), seresnet152 1.2e-4 (calibrated BN;
# ours 1.3e-4). Per-block agreement of these models is within 6e-5.
PARITY_RTOL_OVERRIDES: Dict[str, float] = {"hrnet_w32": 2e-4, "hrnet_w48": 2e-4, "resnest200": 5e-4,
                                           "resnest269": 5e-4, "seresnet152": 5e-4}
# Very deep SE-ResNets whose activations explode under random BatchNorm statistics
# (seresnet152's logits reach ~1e5 and MindCV's own float32 result is 0.44 of max|ref| away
# from float64): their references calibrate BN statistics on a batch instead.
CALIBRATED_BN = {"seresnet101", "seresnet152"}
# Models MindCV cannot run on this machine: the parity test asserts that the
# reference really records MindCV's failure (so nothing is skipped silently) and
# the named test checks the model another way.
PARITY_EXCEPTIONS: Dict[str, str] = {
    # MindCV's rel_logits_1d also calls ops.pad(x, paddings=...), which MindSpore 2.10 rejects on any device.
    "halonet_50t": "MindSpore CPU has no ExtractImagePatches kernel (nn.Unfold); checked in tests/test_halonet.py",
}
# Models that pad "valid" (MindCV and timm alike: unpadded stems, 2x2 valid pools), so
# their maps are smaller than ceil(size / reduction). The contract checks them at two
# larger sizes: every level must shrink by exactly delta / reduction between them.
VALID_PADDED: Dict[str, str] = {
    **{n: "2x2 valid average pools in the transitions" for n in
       ("densenet121", "densenet161", "densenet169", "densenet201")},
    "xception": "unpadded stem convolutions",
    "inception_v3": "unpadded stride-2 convolutions and pools (needs >= 75 px)",
    "inception_v4": "unpadded stride-2 convolutions and pools (needs >= 75 px)",
    "squeezenet1_0": "unpadded 7x7 stride-2 stem and valid (floor) 3x3 max pools",
    "squeezenet1_1": "valid (floor) 3x3 max pools",
    "vgg11": "valid (floor) 2x2 max pools",
    "vgg13": "valid (floor) 2x2 max pools",
    "vgg16": "valid (floor) 2x2 max pools",
    "vgg19": "valid (floor) 2x2 max pools",
    "nasnet_a_4x1056": "unpadded 3x3 stride-2 stem; reduction_cell_0 needs an even stride-8 map (MindCV too)",
    "pnasnet": "unpadded 3x3 stride-2 stem; cell_3 needs an even stride-8 map (MindCV too)",
}
VALID_PADDED_SIZES = (128, 192)
# Models that only run at particular sizes: halo attention needs every stage map to be a
# multiple of its block size 8 (sides 256k-7..256k); RepMLP's fc3 fixes the partition
# (224k..224k+3 or 256k..256k+3 px, rounded down, so no odd size keeps ceil()).
CONTRACT_SIZES: Dict[str, tuple] = {
    "halonet_50t": (256, 249),
    **{f"repmlp_{v}224": (224, 448) for v in ("t", "b")},
    **{f"repmlp_{v}256": (256, 512) for v in ("t", "b", "d", "l")},
}
# Models above this many parameters are shape-checked on the meta device only, and
# their tests share one pytest-xdist group so two never load at once (memory).
# tests/test_contract.py checks that the list is complete.
META_ONLY_PARAMS = 150_000_000
HUGE_MODELS = {"BiT_resnet50x3", "convnext_large", "convnext_xlarge", "convnextv2_huge", "convnextv2_large",
               "efficientnet_v2_xl"}


def zoo_models() -> List[str]:
    """Every model registered by featurezoo itself (not by user code in tests)."""
    return [n for n in fz.list_models() if fz.model_entrypoint(n).__module__.startswith("featurezoo.models.")]


def parity_size(name: str) -> int:
    return PARITY_SIZE_OVERRIDES.get(name, PARITY_SIZE)


def ref_args(name: str) -> dict:
    """Keyword arguments of tests.reference.load_reference / load_meta for this model."""
    return {"size": parity_size(name), "bn": "calibrated" if name in CALIBRATED_BN else "random"}


def jobs() -> List[dict]:
    return [{"model": n, "batch": 2, **ref_args(n)} for n in zoo_models()]


if __name__ == "__main__":
    if sys.argv[1:] != ["jobs"]:
        sys.exit("usage: python -m tests.zoo jobs")
    json.dump(jobs(), sys.stdout, indent=1)
