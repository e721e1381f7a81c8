"""Driver memory of the Ray engine: it must not grow with the inputs beyond the input list itself.

For each ``--images N``, a fresh process generates N tiny PNGs (the same
bytes under N names: only the count matters here), joins Ray (a local
instance, started before the baseline so that Ray's own runtime is not
counted as growth), and runs ``extract_features(..., engine="ray")`` over
them while a thread samples the process's memory from ``/proc/self/status``
every 20 ms. Reported per N:

- ``baseline``: RSS after the imports and ``ray.init``, before the run;
- ``peak`` and ``end``: RSS at its highest during the run, and after it;
- ``anon``: the peak of ``RssAnon`` (private memory; ``RssShmem`` is the
  object store's shared pages the driver touched, e.g. by ``ray.put``);
- ``list``: the bytes of the input list itself (the ``list`` of ``str``
  the driver keeps for ``inputs.json`` and the index).

    python benchmarks/bench_ray_memory.py --images 2000 20000

If the driver's memory is bounded, ``peak - baseline`` grows with N by
about ``list`` (and the transient copies of it: ``inputs.json``, the packed
list handed to the tasks), not by anything per batch or per image.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional


def _status() -> Dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler(threading.Thread):
    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.peak, self.peak_anon, self.stop = every, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            self.peak, self.peak_anon = max(self.peak, s["VmRSS"]), max(self.peak_anon, s["RssAnon"])
            time.sleep(self.every)


def one(n: int, folder: Path, model: str, size: int, batch_size: int) -> Dict[str, float]:
    import numpy as np
    import ray
    from PIL import Image

    from featurezoo.extract import extract_features

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"img_{i:06d}.png"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    list_bytes = sys.getsizeof(paths) + sum(sys.getsizeof(p) for p in paths)
    del paths

    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    import ray.data  # noqa: F401  (imported by the engine anyway; part of the baseline)

    gc.collect()
    baseline = _status()
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    out = folder.parent / f"out_{n}"
    summary = extract_features(model, [folder], out, engine="ray", size=(size, size), batch_size=batch_size,
                               pool="avg", out_indices=[-1], overwrite=True, threads=1)
    seconds = time.perf_counter() - t0
    gc.collect()
    end = _status()
    sampler.stop.set()
    sampler.join()
    ray.shutdown()
    assert summary.complete and summary.images == n, summary
    return dict(images=n, seconds=seconds, baseline=baseline["VmRSS"], peak=sampler.peak, end=end["VmRSS"],
                anon_baseline=baseline["RssAnon"], anon_peak=sampler.peak_anon, list=list_bytes,
                batches=(n + batch_size - 1) // batch_size)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--model", default="mobilenet_v3_small_100")
    ap.add_argument("--size", type=int, default=32, help="model input size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "featurezoo-bench-ray-memory"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single N, in this process
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.one:
        (n,) = args.images
        result = one(n, Path(args.dir) / f"images_{n}", args.model, args.size, args.batch_size)
        print(json.dumps(result))
        return 0

    mb = 2**20
    rows = []
    print(f"{args.model} at {args.size} px, batch {args.batch_size}, pool avg, Ray engine, local Ray instance; "
          f"driver memory in MB")
    print(f"{'images':>7} {'batches':>7} {'s':>6} {'baseline':>9} {'peak':>7} {'end':>7} {'peak-base':>9} "
          f"{'anon peak-base':>14} {'list':>6}")
    for n in args.images:
        cmd = [sys.executable, __file__, "--one", "--images", str(n), "--model", args.model, "--size",
               str(args.size), "--batch-size", str(args.batch_size), "--dir", args.dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{n:7d} {r['batches']:7d} {r['seconds']:6.1f} {r['baseline'] / mb:9.1f} {r['peak'] / mb:7.1f} "
              f"{r['end'] / mb:7.1f} {(r['peak'] - r['baseline']) / mb:9.1f} "
              f"{(r['anon_peak'] - r['anon_baseline']) / mb:14.1f} {r['list'] / mb:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
