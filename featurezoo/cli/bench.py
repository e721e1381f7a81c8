"""``featurezoo bench MODEL``: images/s, latency and peak memory of a feature model, on the inference
path (:func:`featurezoo.optimize_for_inference`) unless ``--eager``; prints the CPU's detected vector
capability and bfloat16 support."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import List

import torch
import torch.nn as nn

from ..extract import DTYPES, build_feature_model, probe_model, resolve_device, resolve_dtype
from ..inference import hardware_report, optimize_for_inference
from .common import EXIT_OK, UsageError, add_levels, check_model, nonneg_int, parse_size, positive_int, table

__all__ = ["NAME", "add_parser", "run", "time_forward"]

NAME = "bench"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="images/s, latency and peak memory of a feature model")
    p.add_argument("model")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="default: 8")
    p.add_argument("--size", type=parse_size, metavar="H[xW]")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="bfloat16 runs under autocast on the inference path (needs bfloat16 hardware); with "
                        "--eager, and for float16, the weights are converted")
    p.add_argument("--eager", action="store_true", help="time the eager model, not the inference path")
    p.add_argument("--compile", action="store_true", help="torch.compile the inference path (not with --eager)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N")
    p.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed batches (default: 10)")
    p.add_argument("--warmup", type=nonneg_int, default=2, metavar="N")
    add_levels(p, None, "all levels")
    return p


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> List[float]:
    """Seconds of each of ``repeats`` forwards of ``x``, after ``warmup`` untimed ones (CUDA synchronised)."""
    dev = x.device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> int:
    check_model(args.model)
    dtype_name, dtype = resolve_dtype(args.dtype)
    dev = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, indices, cfg, _ = probe_model(args.model, args.out_indices, args.size)
    h, w = args.size or tuple(cfg.input_size[1:])
    if args.compile and args.eager:
        raise UsageError("--compile compiles the inference path; drop --eager")
    autocast = dtype == torch.bfloat16 and not args.eager
    model = build_feature_model(args.model, indices, size=args.size, eager=True).to(device=dev)
    if args.eager:
        model = model.to(dtype=dtype)
    else:
        model = optimize_for_inference(model, inplace=True, compile=args.compile,
                                       dtype="bfloat16" if autocast else "float32")
        if not autocast:
            model = model.to(dtype=dtype)
    x_dtype = torch.float32 if autocast else dtype
    x = torch.randn(args.batch_size, cfg.input_size[0], h, w,
                    generator=torch.Generator().manual_seed(0)).to(dev, x_dtype)
    params = sum(p.numel() for p in model.parameters())
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    rss_before = rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = time_forward(model, x, args.warmup, args.repeats)
    med = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    threads = f"{torch.get_num_threads()} threads" if dev.type == "cpu" else str(dev)
    if args.eager:
        path = "eager"
    else:
        path = f"inference path ({'autocast ' if autocast else ''}{'compiled, ' if args.compile else ''}" \
               f"channels_last={model.channels_last}, {len(model.folded)} BatchNorms folded, " \
               f"{model.onednn_linears} linears on oneDNN)"
    hw = hardware_report()
    print(f"{args.model} features, out_indices {indices}, batch {args.batch_size}, {h}x{w}, {dtype_name}, "
          f"{dev.type} ({threads}), {path}")
    print(f"hardware: {hw['cpu_bf16_detail']}; float32 linears on the CPU: {hw['cpu_linear']}"
          + (f"; cuda: {hw['cuda_bf16_detail']}" if "cuda_bf16" in hw else ""))
    rows = [("images/s", f"{args.batch_size / med:.2f}"),
            ("latency / batch", f"{med * 1e3:.1f} ms median of {len(times)}, p90 {p90 * 1e3:.1f} ms"),
            ("latency / image", f"{med * 1e3 / args.batch_size:.2f} ms")]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        rows.append(("peak memory", f"{peak / 2**20:.0f} MiB CUDA allocated "
                                    f"({(peak - base) / 2**20:.0f} MiB above the model and input)"))
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        extra = ""
        if peak > rss_before:
            extra = f" ({(peak - rss_before) / 2**20:.0f} MiB above the loaded model and input)"
        rows.append(("peak memory", f"{peak / 2**20:.0f} MiB process RSS{extra}"))
    rows.append(("params held", f"{params / 1e6:.2f}M ({held / 2**20:.1f} MiB)"))
    print(table(rows))
    return EXIT_OK
