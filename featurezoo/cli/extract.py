"""``featurezoo extract MODEL INPUT... -o OUT [--engine ray ...]``: features of images into a resumable directory
of shards, on this machine or on a Ray cluster."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..extract import DTYPES, ENGINES, POOLS, ExtractSummary, extract_features
from ..extract.plan import MAX_SIZE
from ..extract.store import LAYOUTS
from .common import (EXIT_OK, add_levels, add_weights, check_model, need, nonneg_float, parse_size, plural,
                     positive_float, positive_int, workers)

__all__ = ["NAME", "add_parser", "run", "run_extract"]

NAME = "extract"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="extract features of image files or folders into a directory of shards")
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive) or text files of paths (.txt, .lst, .list)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (resumed if it exists)")
    add_levels(p, None, "all levels")
    p.add_argument("--pool", choices=POOLS, default="none",
                   help="none: store (C,H,W) maps; avg/max: store (C,) vectors (default: none)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="default: 32")
    p.add_argument("--workers", type=workers, default=None, metavar="N",
                   help="decoding processes; 0 decodes in the main process, on --decode-threads threads; auto "
                        "(default) times the first batches: on a CPU, two lanes that each decode a batch and run "
                        "the model on it, or, where decoding costs a quarter of the model's time or more, each "
                        "batch decoded on every core before the model; on a GPU, processes")
    p.add_argument("--decode-threads", type=workers, default=None, metavar="N",
                   help="with no decoding processes: threads decoding while the model runs; 0 decodes between "
                        "batches (default: 1, or with --workers auto as it chooses)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads for the model (default: torch's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--store-dtype", choices=list(DTYPES), default=None,
                   help="dtype of the stored features (default: --dtype); float16 halves what a float32 model writes")
    p.add_argument("--layout", choices=list(LAYOUTS), default=None,
                   help="how unpooled maps are stored in the shards: nhwc (N, H, W, C; the default of a new run, "
                        "written without a transpose) or nchw; a resumed run keeps its own. load_features returns "
                        "(N, C, H, W) either way")
    p.add_argument("--eager", action="store_true",
                   help="run the eager model, not the inference path (folded BatchNorms, channels-last; float32 "
                        "outputs within 1e-5 of the eager model's largest value)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    add_weights(p)
    p.add_argument("--size", type=parse_size, metavar="H[xW]",
                   help=f"model input size, at most {MAX_SIZE} a side (default: the model's cfg)")
    p.add_argument("--no-draft", action="store_true",
                   help="decode JPEGs at full size (default: reduced-scale decoding when the image is >= 2x "
                        "the size needed)")
    p.add_argument("--overwrite", action="store_true", help="replace features in OUT made with other settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("Ray engine (pip install 'featurezoo[ray]')")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this machine (default); ray: a Ray cluster through Ray Data (OUT and the inputs "
                        "must be at the same path on every node, e.g. NFS)")
    g.add_argument("--ray-address", metavar="auto|ADDR",
                   help="join a running Ray cluster (auto: the one on this machine, or RAY_ADDRESS); default: "
                        "start a local Ray instance for this run")
    g.add_argument("--model-workers", type=positive_int, metavar="N",
                   help="model actors (default: one per GPU, or one per cpus-per-worker + 1 CPUs)")
    g.add_argument("--cpus-per-worker", type=positive_float, metavar="C",
                   help="CPUs per model actor, and its torch threads unless --threads (default: 1)")
    g.add_argument("--gpus-per-worker", type=nonneg_float, metavar="G",
                   help="GPUs per model actor; above 0 the model runs on CUDA (default: 0, or 1 with --device cuda)")
    return p


def run_extract(model: str, inputs: Sequence[str], out: str, *, progress: bool = True, **kwargs) -> ExtractSummary:
    """Run an extraction and print what happened (shared by ``extract`` and ``demo``)."""
    summary = extract_features(model, inputs, out, progress=progress, **kwargs)
    before = summary.images + summary.skipped - summary.new_images - summary.new_skipped
    if summary.new_images + summary.new_skipped == 0 and summary.complete:
        print(f"{summary.out_dir}: already complete, nothing to do ({plural(summary.images, 'image')}, "
              f"{summary.skipped} skipped)")
        return summary
    parts = [plural(summary.images, "image"), f"{summary.skipped} skipped"]
    if before:
        parts.append(f"{before} from an earlier run")
    if summary.engine == "ray":
        decoding = f"ray: {plural(summary.model_workers, 'model worker')} on {plural(summary.nodes, 'node')}"
    elif summary.workers:
        decoding = plural(summary.workers, "decoding worker")
    else:
        decoding = "decoded in-process"
    print(f"done: {', '.join(parts)}; {plural(summary.new_images + summary.new_skipped, 'input')} in "
          f"{summary.seconds:.1f} s ({summary.rate:.1f} img/s, {decoding})")
    if summary.skipped:
        print(f"skipped inputs and their reasons are listed in {summary.out_dir / 'index.jsonl'}")
    print(f"features: {summary.out_dir}")
    return summary


def run(args: argparse.Namespace) -> int:
    need(NAME, "PIL")
    check_model(args.model)
    run_extract(args.model, args.inputs, args.out, progress=not args.quiet and sys.stderr.isatty(),
                out_indices=args.out_indices, pool=args.pool, batch_size=args.batch_size, workers=args.workers,
                decode_threads=args.decode_threads, dtype=args.dtype, store_dtype=args.store_dtype,
                layout=args.layout,
                device=args.device, checkpoint_path=args.checkpoint, pretrained=args.pretrained,
                size=args.size, jpeg_draft=not args.no_draft, overwrite=args.overwrite, threads=args.threads,
                engine=args.engine, ray_address=args.ray_address, model_workers=args.model_workers,
                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                eager=args.eager)
    return EXIT_OK
