"""Extraction throughput of ``featurezoo extract`` against the model alone, and of its two engines.

On a folder of generated JPEGs, times (a) the full extraction
(``featurezoo.extract.extract_features``: listing, decoding in DataLoader
workers, preprocessing, the model, pooling, writing shards) and (b) the same
feature model's forward on the same images already decoded and preprocessed
into tensors (same batch size, dtype, threads), once on the model's threads
("model", the baseline of the ratios) and once in two lanes of half the
threads each ("model, 2 lanes": how an automatic CPU run with cheap decoding
runs it). They alternate, so machine noise hits all alike; medians are
reported, and the ratios to the model alone (target >= 0.95).

    python benchmarks/bench_extract.py                                   # resnet50, 224 px, batch 16
    python benchmarks/bench_extract.py --model mobilenet_v3_small_100 --images 256
    python benchmarks/bench_extract.py --workers auto 0 1 2 --threads 2  # compare loader settings
    python benchmarks/bench_extract.py --engines local ray --images 512  # the Ray engine against the local one
    python benchmarks/bench_extract.py --layout --repeats 5              # laying out channels-last maps in C order

With ``--engines ... ray`` each repeat also runs the Ray engine
(``engine="ray"``) on the same images, into its own OUT. Ray is started once
for the benchmark (a local instance with this machine's cores, or
``--ray-address``), as a cluster would be running already; each run still
lists its inputs in Ray tasks and starts its model actor (import, model
build), which the ``wall`` columns include. The ratio of the Ray engine to the
local engine is printed at the end, for both rates.

The images are ``--image-size`` (default 800x600) JPEGs of smooth colour
fields plus noise, which decode about as fast as photos of that size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from featurezoo.extract import DTYPES, Preprocess, build_feature_model, extract_features, pool_features, probe_model


def make_images(folder: Path, n: int, width: int, height: int) -> List[Path]:
    """``n`` JPEGs in ``folder`` (kept between runs: regenerated only if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        f = rng.uniform(8, 40, size=3)
        base = np.stack([np.sin(x / f[0] + i), np.cos(y / f[1] - i), np.sin((x + y) / f[2])], -1) * 90 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
    return paths


def compare_decoders(paths: List[Path], pre: Preprocess, repeats: int) -> None:
    """CPU time (this thread's: robust to a loaded machine) per image of decoding + resize + crop, per decoder.

    The candidates: Pillow with ``draft`` (what featurezoo uses), Pillow at full size,
    simplejpeg decoding at the same DCT scale (1/2, 1/4, 1/8) as ``draft`` and, with
    ``fastdct``/``fastupsample``, faster and with other pixels, and torchvision's
    ``decode_jpeg`` (no reduced-scale decoding). Each resizes with Pillow as
    featurezoo does; the pixels are compared with featurezoo's.
    """
    import io
    import math

    full = dataclasses.replace(pre, jpeg_draft=False)
    crop = full.apply  # the same resize + centre crop, of a decoded image
    candidates = {"pillow, draft (featurezoo)": lambda b: pre.apply(Image.open(io.BytesIO(b))),
                  "pillow, full size": lambda b: full.apply(Image.open(io.BytesIO(b)))}
    try:
        import simplejpeg

        def sj(b: bytes, fast: bool) -> np.ndarray:
            h, w = simplejpeg.decode_jpeg_header(b)[:2]
            scale = max(pre.resize[0] / h, pre.resize[1] / w)
            f = 8 if scale < 1 / 8 else 4 if scale < 1 / 4 else 2 if scale < 1 / 2 else 1  # as draft chooses
            return crop(Image.fromarray(simplejpeg.decode_jpeg(b, "RGB", fastdct=fast, fastupsample=fast,
                                                               min_height=math.ceil(h / f),
                                                               min_width=math.ceil(w / f))))
        candidates[f"simplejpeg {simplejpeg.__version__}, same scale"] = lambda b: sj(b, False)
        candidates["simplejpeg, + fastdct, fastupsample"] = lambda b: sj(b, True)
    except ImportError:
        print("simplejpeg not installed: not compared")
    try:
        from torchvision.io import decode_jpeg

        candidates["torchvision decode_jpeg (full size)"] = lambda b: crop(Image.fromarray(
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)).permute(1, 2, 0).numpy()))
    except ImportError:
        print("torchvision not installed: not compared")
    data = [p.read_bytes() for p in paths]
    cpu_ms: Dict[str, List[float]] = {k: [] for k in candidates}
    for _ in range(repeats):  # alternating
        for name, decode in candidates.items():
            t0 = time.thread_time()
            for b in data:
                decode(b)
            cpu_ms[name].append((time.thread_time() - t0) / len(data) * 1e3)
    ref = np.stack([candidates["pillow, draft (featurezoo)"](b) for b in data]).astype(np.int16)
    print(f"{'decoder':38} {'CPU ms/image':>12} {'max |diff|':>10} {'mean |diff|':>11}")
    for name, decode in candidates.items():
        diff = np.abs(np.stack([decode(b) for b in data]).astype(np.int16) - ref)
        print(f"{name:38} {statistics.median(cpu_ms[name]):12.2f} {diff.max():10d} {diff.mean():11.4f}")


def compare_layouts(model, batch: torch.Tensor, repeats: int) -> None:
    """CPU time (one thread) per image of laying out the model's maps in C order, as the shard writer does.

    The inference path's maps are channels-last; a stored row is C order. Compared: a 3-D strided copy of
    each row, the 2-D transpose ``(H*W, C) -> (C, H*W)`` that the writer uses, and a plain copy (no layout
    change, the floor)."""
    from featurezoo.extract.store import _lay_out

    with torch.inference_mode():
        maps = [m.clone() for m in model(batch)]
    print(f"maps: {', '.join(str(tuple(m.shape[1:])) for m in maps)}, channels-last: "
          f"{[m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous() for m in maps]}, "
          f"{sum(m[0].numel() * m.element_size() for m in maps) / 2**20:.2f} MB per image")
    dests = [torch.empty(m.shape[1:], dtype=m.dtype) for m in maps]
    ways = {"3-D strided copy": lambda d, r: d.copy_(r), "2-D transpose (featurezoo)": _lay_out,
            "plain copy, no layout change": lambda d, r: d.view(-1).copy_(r.permute(1, 2, 0).reshape(-1))}
    times: Dict[str, List[float]] = {k: [] for k in ways}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the writer thread's copies: one thread
    try:
        for _ in range(repeats):
            for name, lay in ways.items():
                t0 = time.thread_time()
                for m, d in zip(maps, dests):
                    for row in m:
                        lay(d, row)
                times[name].append((time.thread_time() - t0) / batch.shape[0] * 1e3)
    finally:
        torch.set_num_threads(threads)
    for name, v in times.items():
        print(f"{name:30} {statistics.median(v):6.2f} CPU ms/image")


def model_only_rate(model, batches: List[torch.Tensor], pool: str, device: torch.device) -> float:
    """Images/s of the forward (plus pooling, as extraction does) on preloaded input tensors."""
    n = sum(b.shape[0] for b in batches)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in batches:
            pool_features(model(x), pool)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)


def model_lanes_rate(model, batches: List[torch.Tensor], pool: str, lanes: int = 2) -> float:
    """Images/s of the model alone in ``lanes`` threads, each with its share of the torch threads and every
    ``lanes``-th batch: how an automatic CPU run with cheap decoding runs the model (``choose_decoding``)."""
    import threading

    n = sum(b.shape[0] for b in batches)

    def lane(i: int) -> None:
        with torch.inference_mode():
            for x in batches[i::lanes]:
                pool_features(model(x), pool)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // lanes))  # the lanes' threads take this count when they start
    try:
        workers = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", default="800x600", help="WxH of the generated JPEGs")
    ap.add_argument("--size", type=int, default=None, help="model input size (default: the model's cfg)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pool", default="none", choices=["none", "avg", "max"])
    ap.add_argument("--out-indices", default="pyramid", help="'pyramid', 'all' or e.g. 1,2,3")
    ap.add_argument("--workers", nargs="+", default=["auto"],
                    help="decoding settings to compare: 'auto' (the default choice), N decoding processes (0: "
                         "decoding threads in this process, --decode-threads; 0:N: N of them), or 'serial' "
                         "(decoding on the model's thread between batches: workers=0, decode_threads=0)")
    ap.add_argument("--decode-threads", type=int, default=None, help="decoding threads where workers is 0")
    ap.add_argument("--store-dtype", default=None, choices=list(DTYPES), help="stored dtype (default: --dtype)")
    ap.add_argument("--store-layout", default=None, choices=["nhwc", "nchw"],
                    help="how unpooled maps are stored (default: extract_features', nhwc)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--extract-threads", default=None,
                    help="the model's torch threads in the extraction runs: a number, or 'auto' (extract_features "
                         "chooses); default --threads, as for the model alone")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "featurezoo-bench-extract"),
                    help="where the images and outputs go")
    ap.add_argument("--engines", nargs="+", default=["local"], choices=["local", "ray"],
                    help="local: the --workers settings; ray: also the Ray engine (needs featurezoo[ray])")
    ap.add_argument("--ray-address", default=None,
                    help="with --engines ray: a running cluster (default: a local Ray instance for the benchmark)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--decoders", action="store_true",
                    help="instead: compare JPEG decoders' CPU time per image and pixels on the images")
    ap.add_argument("--layout", action="store_true",
                    help="instead: compare ways of laying out the model's channels-last maps in C order")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    out_indices = None if args.out_indices == "all" else (
        "pyramid" if args.out_indices == "pyramid" else [int(v) for v in args.out_indices.split(",")])
    size = (args.size, args.size) if args.size else None
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    root = Path(args.dir)
    paths = make_images(root / f"images_{width}x{height}", args.images, width, height)

    _, indices, cfg, shapes = probe_model(args.model, out_indices, size)
    pre = Preprocess.from_cfg(cfg, size, jpeg_draft=not args.no_draft)
    if args.decoders:
        print(f"{args.model}: {len(paths)} JPEGs {width}x{height}, input {pre.size[0]}x{pre.size[1]}, "
              f"{pre.interpolation}, median of {args.repeats}")
        compare_decoders(paths, pre, args.repeats)
        return 0
    model = build_feature_model(args.model, indices).to(device=device, dtype=dtype)
    t0 = time.perf_counter()
    decoded = [torch.from_numpy(pre.load(p)) for p in paths]
    decode_ms = (time.perf_counter() - t0) / len(paths) * 1e3
    batches = [pre.normalize(torch.stack(decoded[i:i + args.batch_size]).to(device), dtype)
               for i in range(0, len(decoded), args.batch_size)]
    out_mb = sum(int(np.prod(s if args.pool == "none" else s[:1])) for s in shapes) * \
        torch.empty((), dtype=dtype).element_size() / 2**20

    print(f"{args.model}: {len(paths)} JPEGs {width}x{height}, input {pre.size[0]}x{pre.size[1]}, batch "
          f"{args.batch_size}, {args.dtype}, {device}, torch threads {args.threads}, cores "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
          f"levels {indices}, pool {args.pool} ({out_mb:.2f} MB stored per image), "
          f"decode+preprocess {decode_ms:.1f} ms/image in one thread, jpeg draft {not args.no_draft}")
    if args.layout:
        compare_layouts(model, batches[0], args.repeats)
        return 0
    with torch.inference_mode():  # warm-up: allocator, kernels
        model(batches[0])

    results: Dict[str, List[float]] = {"model": [], "model, 2 lanes": []}
    walls: Dict[str, List[float]] = {}
    chosen: List[int] = []
    def setting(w: str) -> dict:
        if w == "auto":
            return dict(workers=None, decode_threads=args.decode_threads)
        if w == "serial":
            return dict(workers=0, decode_threads=0)
        if w.startswith("0:"):  # N decoding threads beside the model
            return dict(workers=0, decode_threads=int(w[2:]))
        return dict(workers=int(w), decode_threads=args.decode_threads if w == "0" else None)

    runs = [(f"extract w={w}", setting(w)) for w in args.workers] if "local" in args.engines else []
    if "ray" in args.engines:
        import ray

        ray.init(address=args.ray_address, include_dashboard=False if args.ray_address is None else None,
                 logging_level=logging.ERROR, log_to_driver=False)
        runs.append(("extract ray", dict(engine="ray")))
    for name, _ in runs:
        results[name], walls[name] = [], []
    common = dict(out_indices=indices, pool=args.pool, batch_size=args.batch_size, dtype=args.dtype,
                  device=args.device, size=size, jpeg_draft=not args.no_draft, overwrite=True,
                  threads=args.threads if args.extract_threads is None else
                  None if args.extract_threads == "auto" else int(args.extract_threads),
                  store_dtype=args.store_dtype, layout=args.store_layout)
    splits: Dict[str, List[dict]] = {}
    # CPU time of this process (all its threads; not decoding processes) per image: what a loaded machine
    # changes least. The extraction's includes its start (model build, listing, probing).
    cpu: Dict[str, List[float]] = {}
    for r in range(args.repeats):
        c0 = time.process_time()
        results["model"].append(model_only_rate(model, batches, args.pool, device))
        cpu.setdefault("model", []).append((time.process_time() - c0) / len(paths) * 1e3)
        c0 = time.process_time()
        results["model, 2 lanes"].append(model_lanes_rate(model, batches, args.pool))
        cpu.setdefault("model, 2 lanes", []).append((time.process_time() - c0) / len(paths) * 1e3)
        for name, engine_args in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            s = extract_features(args.model, [paths[0].parent], root / f"out_{name.split()[-1]}", **common,
                                 **engine_args)
            walls[name].append(s.new_images / (time.perf_counter() - t0))
            cpu.setdefault(name, []).append((time.process_time() - c0) / s.new_images * 1e3)
            results[name].append(s.new_images / s.seconds)
            if engine_args.get("workers", 0) is None:
                chosen.append(s.workers)
            with open(s.out_dir / "meta.json") as f:
                last = json.load(f)["runs"][-1]
            splits.setdefault(name, []).append({k: last.get(k) for k in ("model_s", "input_wait_s", "write_wait_s",
                                                                          "threads", "decode_threads", "workers")})
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)

    base = statistics.median(results["model"])
    print(f"{'':18} {'img/s (median)':>15} {'ratio to model':>15} {'wall img/s':>11} {'CPU ms/img':>11}")
    rows = []
    for k, v in results.items():
        med = statistics.median(v)
        wall = statistics.median(walls[k]) if k in walls else None
        c = statistics.median(cpu[k]) if k in cpu else None
        rows.append(dict(setting=k, rate=med, ratio=med / base, runs=v, wall_rate=wall, wall_runs=walls.get(k),
                         cpu_ms=c))
        print(f"{k:18} {med:15.2f} {med / base:15.3f} {'' if wall is None else f'{wall:11.2f}':>11} "
              f"{'' if c is None else f'{c:11.1f}'}")
    if chosen:
        print(f"auto chose {sorted(set(chosen))} worker(s)")
    for name, split in splits.items():
        if split[0]["model_s"] is not None:
            print(f"{name}: model's thread in the model " + ", ".join(f"{d['model_s']:.2f}" for d in split) +
                  " s; waiting for input " + ", ".join(f"{d['input_wait_s']:.2f}" for d in split) +
                  " s; waiting for the writer " + ", ".join(f"{d['write_wait_s']:.2f}" for d in split) + " s; "
                  f"model threads {split[-1]['threads']}, decoding threads {split[-1]['decode_threads']}, "
                  f"processes {split[-1]['workers']}")
    if "ray" in args.engines and len(runs) > 1:
        local = runs[0][0]
        ratio = statistics.median(results["extract ray"]) / statistics.median(results[local])
        wall_ratio = statistics.median(walls["extract ray"]) / statistics.median(walls[local])
        print(f"ray engine / local engine ({local}): {ratio:.3f} (extraction rate), {wall_ratio:.3f} (wall, "
              f"including the Ray run's listing and model-actor start)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), decode_ms=decode_ms, results=rows, auto_workers=chosen, splits=splits), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
