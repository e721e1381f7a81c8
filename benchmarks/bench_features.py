"""Side-by-side speed and memory of featurezoo feature models against timm's.

Both models run in this one process, eager fp32 (or the dtype asked), same
thread count, same input; timed runs alternate between them so machine noise
hits both alike. Prints medians, the ratio ours/timm (lower is better), the
parameters each holds, and the peak memory of one forward (CUDA allocator
peak on GPU; on CPU the peak RSS growth of a fresh process running it).

    python benchmarks/bench_features.py                       # resnet50, batch 8, 224 px
    python benchmarks/bench_features.py --models resnet50 convnext_tiny --batch 8 --size 224 --repeats 15
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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


def time_pair(models, x, repeats: int, warmup: int, device: str) -> List[List[float]]:
    times: List[List[float]] = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models:
                m(x)
        _sync(device)
        for r in range(repeats):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for i in order:
                _sync(device)
                t0 = time.perf_counter()
                models[i](x)
                _sync(device)
                times[i].append(time.perf_counter() - t0)
    return times


def peak_forward_bytes(name: str, which: int, args) -> int:
    """Peak memory one forward adds. CUDA: the allocator's peak. CPU: the RSS high-water
    mark of a fresh interpreter, reset after building (forking this one would hang OpenMP)."""
    if args.device == "cuda":
        model = build_pair(name, args.device, getattr(torch, args.dtype))[which]
        x = torch.randn(args.batch, 3, args.size, args.size, device="cuda", dtype=getattr(torch, args.dtype))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model(x)
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, __file__, "--peak-child", name, str(which), "--batch", str(args.batch),
           "--size", str(args.size), "--threads", str(args.threads), "--dtype", args.dtype]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(name: str, which: int, args) -> None:
    import ctypes
    import gc

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_pair(name, "cpu", dtype)[which]
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=dtype)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building the models freed
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        model(x)
    print((_status_kib("VmHWM") - before) * 1024)


def held_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50"], choices=sorted(TIMM_TWINS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peak-child", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        _peak_child(args.peak_child[0], int(args.peak_child[1]), args)
        return 0
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, batch {args.batch}, "
          f"{args.size}px, {args.dtype}, {args.repeats} alternating repeats")
    header = f"{'model':24} {'ours ms':>9} {'timm ms':>9} {'ratio':>6} {'ours MP':>8} {'timm MP':>8} " \
             f"{'ours peak MB':>12} {'timm peak MB':>12}"
    print(header)
    results = []
    for name in args.models:
        torch.manual_seed(0)
        models = build_pair(name, args.device, dtype)
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=dtype)
        with torch.inference_mode():
            ours_out, timm_out = (m(x) for m in models)
        shapes = ([tuple(o.shape) for o in ours_out], [tuple(o.shape) for o in timm_out])
        t_ours, t_timm = time_pair(models, x, args.repeats, args.warmup, args.device)
        med_ours, med_timm = statistics.median(t_ours) * 1e3, statistics.median(t_timm) * 1e3
        peaks = [0.0, 0.0] if args.no_memory else [peak_forward_bytes(name, i, args) / 2**20 for i in range(2)]
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in models]
        row = dict(model=name, ours_ms=med_ours, timm_ms=med_timm, ratio=med_ours / med_timm,
                   ours_mparams=params[0], timm_mparams=params[1], ours_peak_mb=peaks[0], timm_peak_mb=peaks[1],
                   ours_held_mb=held_bytes(models[0]) / 2**20, timm_held_mb=held_bytes(models[1]) / 2**20,
                   ours_shapes=shapes[0], timm_shapes=shapes[1])
        results.append(row)
        print(f"{name:24} {med_ours:9.1f} {med_timm:9.1f} {row['ratio']:6.3f} {params[0]:8.2f} {params[1]:8.2f} "
              f"{peaks[0]:12.1f} {peaks[1]:12.1f}")
        if shapes[0] != shapes[1]:
            print(f"  note: output shapes differ: ours {shapes[0]} timm {shapes[1]}")
        del models
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
