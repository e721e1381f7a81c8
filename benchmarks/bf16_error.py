"""The bfloat16 error of the inference path, per family: max |bf16 - fp32| / max |fp32| of each feature level.

For each family the smallest model (fewest parameters) is built with random initialisation
(seed 0, BatchNorm statistics as initialised), fed one ``--size`` image of N(0, 0.1^2)
values (``--std``), and run twice: ``fz.optimize_for_inference(model)`` in float32, and
``fz.optimize_for_inference(model, dtype="bfloat16")`` (autocast). The table lists the
error of the deepest level and the largest over all levels.

    python benchmarks/bf16_error.py                      # every family, 224 px, into benchmarks/bf16_error.md
    python benchmarks/bf16_error.py --families resnet vit --size 128

Where the CPU lacks bfloat16 arithmetic (no avx512_bf16 / amx_bf16) it runs emulated
(``allow_emulated_bf16=True``; slow): the rounding of inputs and weights to bfloat16 is the
same, the accumulation order of the kernels may differ from oneDNN's AMX kernels.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch

import featurezoo as fz
from featurezoo.atomic import atomic_write
from featurezoo.freezing import probe_input_size
from featurezoo.inference import bf16_support
from featurezoo.registry import model_module


def smallest_per_family() -> Dict[str, str]:
    best: Dict[str, tuple] = {}
    for name in fz.list_models():
        if not fz.model_entrypoint(name).__module__.startswith("featurezoo.models."):
            continue
        with torch.device("meta"):
            n = sum(p.numel() for p in fz.create_model(name).parameters())
        fam = model_module(name)
        if fam not in best or n < best[fam][0]:
            best[fam] = (n, name)
    return {fam: name for fam, (n, name) in sorted(best.items())}


def errors(name: str, size: int, std: float) -> List[float]:
    torch.manual_seed(0)
    model = fz.create_model(name, features_only=True).eval()
    cfg = model.default_cfg
    low = probe_input_size(cfg)  # the smallest size the model takes (its input_sides, valid padding)
    sides = tuple(cfg.input_sides or ())
    h, w = (sides[0], sides[0]) if sides else (max(size, low[0]), max(size, low[1]))
    x = torch.randn(1, cfg.input_size[0], h, w) * std
    with torch.no_grad():
        ref = fz.optimize_for_inference(model)(x)
        got = fz.optimize_for_inference(model, dtype="bfloat16", allow_emulated_bf16=True)(x)
    ref = list(ref.values()) if isinstance(ref, dict) else list(ref)
    got = list(got.values()) if isinstance(got, dict) else list(got)
    return [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref, got)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--std", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--out", default="benchmarks/bf16_error.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ok, why = bf16_support("cpu")
    fams = smallest_per_family()
    if args.families:
        unknown = sorted(set(args.families) - set(fams))
        if unknown:
            p.error(f"unknown families {unknown}; valid: {', '.join(fams)}")
        fams = {f: fams[f] for f in args.families}
    rows = [f"bfloat16 (autocast) vs float32 on the inference path, {args.size} px, N(0, {args.std}^2) input, "
            f"random init; CPU: {why}{'' if ok else ' (emulated)'}", "",
            "| family | model | deepest level | worst level |", "|---|---|---|---|"]
    for fam, name in fams.items():
        t = time.perf_counter()
        try:
            errs = errors(name, args.size, args.std)
            rows.append(f"| {fam} | {name} | {errs[-1]:.2e} | {max(errs):.2e} |")
        except Exception as e:  # a family that cannot run is listed with the reason, the table goes on
            rows.append(f"| {fam} | {name} | failed: {type(e).__name__} | {str(e).splitlines()[0][:80]} |")
        print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    with atomic_write(args.out, "w") as f:
        f.write("\n".join(rows) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
