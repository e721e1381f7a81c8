"""Side-by-side speed and memory of featurezoo feature models against timm's, in one run.

Per model, the columns (``--columns`` picks a subset; compiling costs minutes):

    timm          timm's feature model, eager fp32
    timm_compile  the same, torch.compile'd (default options)
    fz            featurezoo's feature model, eager fp32
    fz_infer      fz.optimize_for_inference(model) fp32 ("n/a" until that function exists)
    fz_bf16       fz.optimize_for_inference(model, dtype="bfloat16")
    ort           onnxruntime on featurezoo's ONNX export (featurezoo.onnx_export; needs the [onnx] extra)

All columns run in this one process, same threads and input; timed runs rotate
through the columns (each repeat starts at the next column) so machine noise
hits all alike. Printed: median ms, timm/column speed-up (higher is better),
GFLOP/s of featurezoo's forward (its FLOPs counted once with
``torch.utils.flop_counter.FlopCounterMode``, divided by each column's median)
and that as a fraction of this CPU's fp32 peak, measured in the same run as
the best of several 2048x2048 fp32 matrix products at the same thread count, by the faster of
``torch.mm`` and oneDNN's linear (on the AMD EPYC of the README's table, MKL's ``torch.mm``
reaches less than half of what oneDNN does).

Memory (``--memory``): peak allocator bytes of one forward under
``torch.inference_mode``, for timm, fz eager and the fp32 inference path. On CUDA the allocator's own
peak. On CPU there is no allocator counter, so the forward runs under
``torch.profiler`` with ``profile_memory=True``, which records every
allocation and free with its size and time; sorted by time, their running sum
is the bytes live beyond what existed before the call (weights, input), and
its maximum is the peak. (The CPU allocator keeps no cache, so requested
bytes are live bytes; unlike RSS this does not depend on what glibc returns
to the system.) The outputs the forward returns are included: both hold them.

    python benchmarks/bench_features.py                                   # every model and column
    python benchmarks/bench_features.py --models resnet50 --columns timm fz --repeats 15 --memory
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

import featurezoo as fz

# featurezoo name -> (timm name, timm out_indices giving the same levels as our pyramid)
TIMM_TWINS: Dict[str, Tuple[str, Sequence[int]]] = {
    "resnet50": ("resnet50", (1, 2, 3, 4)),
    "convnext_tiny": ("convnext_tiny", (0, 1, 2, 3)),
    "efficientnet_b0": ("efficientnet_b0", (0, 1, 2, 3, 4)),
    "mobilenet_v3_large_100": ("mobilenetv3_large_100", (0, 1, 2, 3, 4)),
    "hrnet_w32": ("hrnet_w32", (0, 1, 2, 3, 4)),
    "resnetv2_50": ("resnetv2_50", (0, 1, 2, 3, 4)),
    "densenet121": ("densenet121", (0, 1, 2, 3, 4)),
    "regnet_y_1_6gf": ("regnety_016", (0, 1, 2, 3, 4)),
    "inception_v3": ("inception_v3", (0, 1, 2, 3, 4)),
    "pvt_v2_b2": ("pvt_v2_b2", (0, 1, 2, 3)),
    "poolformer_s12": ("poolformer_s12", (0, 1, 2, 3)),
    "swin_tiny": ("swin_tiny_patch4_window7_224", (0, 1, 2, 3)),  # timm outputs NHWC, we NCHW
    "vit_b_16_224": ("vit_base_patch16_224", (2, 5, 8, 11)),  # 4 evenly spaced blocks
    "vit_l_16_224": ("vit_large_patch16_224", (5, 11, 17, 23)),
}
# The table.
TABLE_MODELS = ("resnet50", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large_100", "hrnet_w32", "densenet121",
                "regnet_y_1_6gf", "swin_tiny", "vit_b_16_224")
# Plain models list every block at one reduction: their levels are matched by name (blocks.i), not reduction.
PLAIN = {"vit_b_16_224", "vit_l_16_224"}


def build_pair(name: str, device: str, dtype: torch.dtype):
    """Our feature model and timm's, outputting the same levels (same reductions)."""
    import timm

    timm_name, timm_idx = TIMM_TWINS[name]
    theirs = timm.create_model(timm_name, features_only=True, out_indices=timm_idx, pretrained=False)
    info = fz.get_feature_info(name)
    if name in PLAIN:
        ours_idx = [info.module_name().index(n) for n in theirs.feature_info.module_name()]
    else:
        # At each of timm's reductions, our entry with timm's channels (EfficientNet's last stage, not its
        # 1x1 head conv), else the last one there (the pyramid's entry).
        ours_idx = []
        for r, c in zip(theirs.feature_info.reduction(), theirs.feature_info.channels()):
            at = [i for i, e in enumerate(info) if e["reduction"] == r]
            same = [i for i in at if info[i]["chs"] == c]
            if at:
                ours_idx.append((same or at)[-1])
    ours = fz.create_model(name, features_only=True, out_indices=ours_idx)
    return [m.eval().to(device=device, dtype=dtype) for m in (ours, theirs)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_forward_bytes(model, x) -> int:
    """Peak bytes one forward allocates beyond what exists before it (see the module docstring)."""
    with torch.inference_mode():
        model(x)  # warm: lazily built constants are not the forward's
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(x)
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_columns(ours, theirs, x, infer=None) -> Dict[str, float]:
    """Peak forward MB of timm's model, ours eager and ours through the inference path (fp32; ``infer``,
    the column's model if it was built, else optimised here)."""
    mb = {"timm": peak_forward_bytes(theirs, x) / 2**20, "fz": peak_forward_bytes(ours, x) / 2**20}
    optimize = _optimize_for_inference()
    if infer is None and optimize is not None:
        infer = optimize(ours)
    if infer is not None:
        mb["fz_infer"] = peak_forward_bytes(infer, x) / 2**20
    return mb


def held_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def forward_flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def _best_seconds(fn, device: str, tries: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        fn()
        for _ in range(tries):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_gflops(device: str, n: int = 2048, tries: int = 7) -> Dict[str, float]:
    """The best fp32 GFLOP/s of an n x n x n product per kernel: ``torch.mm`` (the BLAS) and, on the CPU,
    oneDNN's linear (the kernel of the inference path's linears); ``"peak"`` is the larger."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    flop = 2 * n ** 3 / 1e9
    rates = {"mm": flop / _best_seconds(lambda: a @ b, device, tries)}
    if device == "cpu":
        from featurezoo.layers.linear import onednn_linear, onednn_linear_available

        if onednn_linear_available():
            w = b.t().contiguous()
            rates["onednn"] = flop / _best_seconds(lambda: onednn_linear(a, w, None), device, tries)
    rates["peak"] = max(rates.values())
    return rates


COLUMNS = ("timm", "timm_compile", "fz", "fz_infer", "fz_bf16", "ort")


def _optimize_for_inference():
    try:
        from featurezoo.inference import optimize_for_inference
    except ImportError:
        return None
    return optimize_for_inference


def _ort_runner(model, x, threads: int):
    import os
    import tempfile

    import onnxruntime as ort

    from featurezoo.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path, size=tuple(x.shape[-2:]), batch_size=x.shape[0])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda inp: sess.run(None, {name: inp.cpu().numpy()})


def build_columns(ours, theirs, columns: Sequence[str], args, x) -> Dict[str, object]:
    """column -> callable(x) on the pair from :func:`build_pair`, or a string saying why it is not available."""
    built: Dict[str, object] = {}
    optimize = _optimize_for_inference()
    for col in columns:
        try:
            if col == "timm":
                built[col] = theirs
            elif col == "timm_compile":
                built[col] = torch.compile(theirs)
            elif col == "fz":
                built[col] = ours
            elif col in ("fz_infer", "fz_bf16"):
                if optimize is None:
                    built[col] = "n/a: no featurezoo.inference yet"
                else:
                    built[col] = optimize(ours, dtype="bfloat16" if col == "fz_bf16" else "float32")
            elif col == "ort":
                built[col] = _ort_runner(ours, x, args.threads)
        except Exception as e:  # a column that cannot be built is reported, not fatal
            built[col] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return built


def time_columns(fns: Dict[str, object], x, repeats: int, warmup: int, device: str) -> Dict[str, List[float]]:
    names = [c for c, f in fns.items() if callable(f)]
    times: Dict[str, List[float]] = {c: [] for c in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for c in names:
                fns[c](x)
        for r in range(repeats):
            for k in range(len(names)):
                c = names[(r + k) % len(names)]
                _sync(device)
                t0 = time.perf_counter()
                fns[c](x)
                _sync(device)
                times[c].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(TABLE_MODELS), choices=sorted(TIMM_TWINS))
    ap.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS)
    ap.add_argument("--memory", action="store_true", help="also measure the peak forward memory of timm and fz")
    ap.add_argument("--memory-only", action="store_true", help="only the peak forward memory (no timing)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = {"peak": 0.0} if args.memory_only else matmul_peak_gflops(args.device)
    peak = rates["peak"]
    kernels = ", ".join(f"{k} {v:.1f}" for k, v in rates.items() if k != "peak")
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, batch {args.batch}, "
          f"{args.size}px, {args.repeats} rotating repeats; fp32 matmul peak {peak:.1f} GFLOP/s ({kernels})")
    if args.device == "cpu":
        from featurezoo.inference import hardware_report

        print(f"hardware: {hardware_report()}")
    results = []
    if args.memory_only:
        print(f"{'model':24} {'timm peak MB':>12} {'fz peak MB':>10} {'fz/timm':>8} {'fz_infer MB':>11} "
              f"{'infer/timm':>10}")
    for name in args.models:
        torch.manual_seed(0)
        if args.memory_only:
            x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
            ours, theirs = build_pair(name, args.device, torch.float32)
            mb = peak_columns(ours, theirs, x)
            results.append(dict(model=name, peak_mb=mb))
            infer = mb.get("fz_infer", float("nan"))
            print(f"{name:24} {mb['timm']:12.1f} {mb['fz']:10.1f} {mb['fz'] / mb['timm']:8.3f} {infer:11.1f} "
                  f"{infer / mb['timm']:10.3f}", flush=True)
            continue
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        ours, theirs = build_pair(name, args.device, torch.float32)
        fns = build_columns(ours, theirs, args.columns, args, x)
        flops = forward_flops(ours, x)
        with torch.inference_mode():
            shapes = ([tuple(o.shape) for o in ours(x)], [tuple(o.shape) for o in theirs(x)])
        times = time_columns(fns, x, args.repeats, args.warmup, args.device)
        med = {c: statistics.median(t) * 1e3 for c, t in times.items()}
        row = dict(model=name, gflop=flops / 1e9, ms=med, peak_gflops=peak, matmul_gflops=rates,
                   unavailable={c: f for c, f in fns.items() if not callable(f)},
                   fz_shapes=shapes[0], timm_shapes=shapes[1])
        if args.memory:
            infer = fns.get("fz_infer")
            row["peak_mb"] = peak_columns(ours, theirs, x, infer if callable(infer) else None)
            row["held_mb"] = {"timm": held_bytes(theirs) / 2**20, "fz": held_bytes(ours) / 2**20}
        results.append(row)
        print(f"\n{name}: {flops / 1e9:.2f} GFLOP per forward (fz)")
        print(f"  {'column':14} {'ms':>9} {'vs timm':>8} {'GFLOP/s':>8} {'of peak':>8}")
        for c in args.columns:
            if c not in med:
                print(f"  {c:14} {fns[c]}")
                continue
            speed = f"{med['timm'] / med[c]:8.3f}" if "timm" in med else f"{'':8}"
            gfs = flops / 1e9 / (med[c] / 1e3)
            print(f"  {c:14} {med[c]:9.1f} {speed} {gfs:8.1f} {gfs / peak:8.3f}")
        if args.memory:
            print("  peak forward MB: " + ", ".join(f"{k} {v:.1f}" for k, v in row["peak_mb"].items()))
        if shapes[0] != shapes[1]:
            print(f"  note: output shapes differ: fz {shapes[0]} timm {shapes[1]}")
        del fns, ours, theirs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
