"""The ``featurezoo`` command: inspect backbones and extract multi-scale features.

    featurezoo list [PATTERN] [--features-only]
    featurezoo info MODEL [--size H[xW]]
    featurezoo extract MODEL INPUT... -o OUT [--out-indices 1,2,3 | --pyramid] [--pool none|avg|max] ...
    featurezoo plot MODEL IMAGE -o pyramid.png
    featurezoo bench MODEL [--batch-size N] [--size H[xW]] [--dtype ...]
    featurezoo demo [--out DIR]

Errors in the arguments print one line and exit with status 2, before
anything is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["main", "build_parser"]

_logger = logging.getLogger("featurezoo.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_MODEL = "resnet50"
DEMO_IMAGE = "grace_hopper.jpg"


class UsageError(Exception):
    """A bad command line; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# -- argument types ---------------------------------------------------------------------------------
def parse_size(text: str) -> Tuple[int, int]:
    """``"224"`` -> (224, 224); ``"224x320"`` -> (224, 320) as (H, W)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"size must be H or HxW with positive integers (e.g. 224 or 224x320), "
                                         f"got {text!r}")
    return (values[0], values[-1])


def parse_out_indices(text: str) -> Union[List[int], str, None]:
    """``"1,2,3"``, ``"-1"``, ``"all"`` or ``"pyramid"``."""
    if text in ("all", "pyramid"):
        return None if text == "all" else "pyramid"
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"out-indices must be comma-separated integers (e.g. 1,2,3 or -1), "
                                         f"'all' or 'pyramid', got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _workers(text: str) -> Optional[int]:
    return None if text == "auto" else _nonneg_int(text)


def _add_levels(p: argparse.ArgumentParser, default: Union[List[int], str, None], what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out-indices", type=parse_out_indices, default=default, metavar="I,J,...",
                   help=f"feature levels (indices into feature_info; negative count from the end; 'all'); "
                        f"default: {what}")
    g.add_argument("--pyramid", dest="out_indices", action="store_const", const="pyramid",
                   help="the last level at each distinct reduction (the detector pyramid)")


def _add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", default="", metavar="PATH",
                   help="weights to load (.ckpt, .pt/.pth/.bin, .safetensors); default: random initialisation")
    g.add_argument("--pretrained", action="store_true", help="download (once) and load the published weights")


def build_parser() -> argparse.ArgumentParser:
    from .extract import DTYPES, POOLS

    ap = _Parser(prog="featurezoo", description="Vision backbones with multi-scale feature extraction.")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log more (each skipped image, resumes, worker choice; tracebacks of errors)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("list", help="models: parameters, feature levels, reductions, pretrained weights")
    p.add_argument("pattern", nargs="?", help="shell-style wildcard, e.g. 'resnet*'")
    p.add_argument("--features-only", action="store_true", help="only models that support features_only")

    p = sub.add_parser("info", help="a model's feature levels, output sizes, parameters, FLOPs, input cfg")
    p.add_argument("model")
    p.add_argument("--size", type=parse_size, metavar="H[xW]", help="input size (default: the model's cfg)")
    _add_levels(p, None, "also report the usual choices")

    p = sub.add_parser("extract", help="extract features of image files or folders into a directory of shards")
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive) or text files of paths (.txt, .lst, .list)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (resumed if it exists)")
    _add_levels(p, None, "all levels")
    p.add_argument("--pool", choices=POOLS, default="none",
                   help="none: store (C,H,W) maps; avg/max: store (C,) vectors (default: none)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="default: 32")
    p.add_argument("--workers", type=_workers, default=None, metavar="N",
                   help="decoding processes; 0 decodes in the main process; auto (default) times the first "
                        "batches and uses workers only where decoding is slow next to the model")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads for the model (default: torch's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    _add_weights(p)
    p.add_argument("--size", type=parse_size, metavar="H[xW]", help="model input size (default: the model's cfg)")
    p.add_argument("--no-draft", action="store_true",
                   help="decode JPEGs at full size (default: reduced-scale decoding when the image is >= 2x "
                        "the size needed)")
    p.add_argument("--overwrite", action="store_true", help="replace features in OUT made with other settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("plot", help="one panel per feature level over the input image")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("-o", "--out", required=True, metavar="PNG")
    _add_levels(p, "pyramid", "the pyramid")
    p.add_argument("--mode", choices=["pca", "mean"], default="pca",
                   help="pca: first 3 principal components as RGB; mean: channel-mean heatmap (default: pca)")
    _add_weights(p)
    p.add_argument("--size", type=parse_size, metavar="H[xW]")

    p = sub.add_parser("bench", help="images/s, latency and peak memory of a feature model")
    p.add_argument("model")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="default: 8")
    p.add_argument("--size", type=parse_size, metavar="H[xW]")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N")
    p.add_argument("--repeats", type=_positive_int, default=10, metavar="N", help="timed batches (default: 10)")
    p.add_argument("--warmup", type=_nonneg_int, default=2, metavar="N")
    _add_levels(p, None, "all levels")

    p = sub.add_parser("demo", help="info, extraction and plot of the built-in sample image (no network)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="default: ./demo_out")
    p.add_argument("--model", default=DEMO_MODEL, help=f"default: {DEMO_MODEL}")
    _add_weights(p)
    return ap


def _version() -> str:
    from . import __version__

    return __version__


# -- formatting ---------------------------------------------------------------------------------------
def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [str(v).rjust(w) if c in right else str(v).ljust(w) for c, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _mparams(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _gflops(n: int) -> str:
    g = n / 1e9
    return f"{g:.3f}" if g < 1 else f"{g:.2f}" if g < 100 else f"{g:.0f}"


def _hw(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(e: BaseException, model: str = "") -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    first = lines[0].rstrip(": ")
    if len(lines) > 1 and "out_indices" in first and model:
        first += f" (run `featurezoo info {model}` for the levels)"
    return first


# -- commands ----------------------------------------------------------------------------------------------
def _check_model(name: str) -> None:
    from .registry import model_entrypoint

    model_entrypoint(name)  # ValueError naming close matches


def cmd_list(args) -> int:
    from .cli_inspect import model_row
    from .registry import list_models

    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"no model matches {args.pattern!r}; run `featurezoo list` for all models")
    rows = [("name", "params", "levels", "reductions", "pretrained")]
    for name in names:
        r = model_row(name)
        if args.features_only and r.levels is None:
            continue
        rows.append((r.name, _mparams(r.params), "-" if r.levels is None else str(r.levels),
                     ",".join(str(x) for x in r.reductions) or "-", "yes" if r.pretrained else "no"))
    print(_table(rows, right=(1, 2)))
    print(f"\n{len(rows) - 1} models; params of the feature model with every level "
          f"(`featurezoo info MODEL` for details)")
    return EXIT_OK


def print_info(name: str, size: Optional[Tuple[int, int]] = None, out_indices=None) -> None:
    from .cli_inspect import model_report
    from .extract import Preprocess

    rep = model_report(name, size, out_indices)
    cfg = rep.cfg
    pre = Preprocess.from_cfg(cfg, rep.size)
    h, w = rep.size
    print(f"{name}: input {cfg.input_size[0]}x{h}x{w}" + ("" if size is None else f" (cfg: {_hw(cfg.input_size)})"))
    print(f"preprocessing: resize to cover {_hw(pre.resize)} ({cfg.interpolation}, crop_pct {cfg.crop_pct}), "
          f"centre crop {h}x{w}, mean {tuple(cfg.mean)}, std {tuple(cfg.std)}")
    print(f"pretrained weights: {cfg.url or 'none published'}")
    print()
    rows = [("index", "name", "channels", "reduction", f"output at {h}x{w}", "params held", "GFLOPs")]
    for lv in rep.levels:
        rows.append((str(lv.index), lv.name, str(lv.chs), str(lv.reduction), _hw(lv.shape[1:]),
                     _mparams(lv.params), _gflops(lv.flops)))
    print(_table(rows, right=(0, 2, 3, 5, 6)))
    print("(params held / GFLOPs: the feature model whose deepest output is that level)")
    print()
    rows = [("out_indices", "levels", "params held", "GFLOPs")]
    for c in rep.choices:
        rows.append((c.label, "-" if c.indices is None else ",".join(str(i) for i in c.indices),
                     _mparams(c.params), _gflops(c.flops)))
    print(_table(rows, right=(2, 3)))
    print("(GFLOPs at batch 1, counted by torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add)")


def cmd_info(args) -> int:
    _check_model(args.model)
    print_info(args.model, args.size, args.out_indices)
    return EXIT_OK


def run_extract(model: str, inputs: Sequence[str], out: str, *, progress: bool = True, **kwargs):
    """Run an extraction and print what happened (shared by ``extract`` and ``demo``)."""
    from .extract import extract_features

    summary = extract_features(model, inputs, out, progress=progress, **kwargs)
    before = summary.images + summary.skipped - summary.new_images - summary.new_skipped
    if summary.new_images + summary.new_skipped == 0 and summary.complete:
        print(f"{summary.out_dir}: already complete, nothing to do ({_plural(summary.images, 'image')}, "
              f"{summary.skipped} skipped)")
        return summary
    parts = [_plural(summary.images, "image"), f"{summary.skipped} skipped"]
    if before:
        parts.append(f"{before} from an earlier run")
    decoding = "decoded in-process" if not summary.workers else f"{_plural(summary.workers, 'decoding worker')}"
    print(f"done: {', '.join(parts)}; {_plural(summary.new_images + summary.new_skipped, 'input')} in "
          f"{summary.seconds:.1f} s ({summary.rate:.1f} img/s, {decoding})")
    if summary.skipped:
        print(f"skipped inputs and their reasons are listed in {summary.out_dir / 'index.jsonl'}")
    print(f"features: {summary.out_dir}")
    return summary


def cmd_extract(args) -> int:
    _check_model(args.model)
    run_extract(args.model, args.inputs, args.out, progress=not args.quiet and sys.stderr.isatty(),
                out_indices=args.out_indices, pool=args.pool, batch_size=args.batch_size, workers=args.workers,
                dtype=args.dtype, device=args.device, checkpoint_path=args.checkpoint, pretrained=args.pretrained,
                size=args.size, jpeg_draft=not args.no_draft, overwrite=args.overwrite, threads=args.threads)
    return EXIT_OK


def make_plot(model_name: str, image: str, out: str, out_indices="pyramid", mode: str = "pca",
              checkpoint: str = "", pretrained: bool = False, size=None) -> Path:
    import torch

    from .cli_plot import render_pyramid
    from .extract import ExtractError, Preprocess, build_feature_model, probe_model, weights_setting
    from .extract_data import SkippedImage

    out_path = Path(out)
    if out_path.is_dir() or not out_path.parent.is_dir():
        raise ExtractError(f"cannot write the plot to {out}: "
                           f"{'it is a directory' if out_path.is_dir() else 'its folder does not exist'}")
    info, indices, cfg, _ = probe_model(model_name, out_indices, size)
    weights_setting(checkpoint, pretrained)
    pre = Preprocess.from_cfg(cfg, size)
    try:
        crop = pre.load(image)
    except SkippedImage as e:
        raise ExtractError(f"cannot plot {image}: {e}") from None
    model = build_feature_model(model_name, indices, checkpoint, pretrained)
    with torch.inference_mode():
        feats = model(pre.normalize(torch.from_numpy(crop)[None]))
    weights = checkpoint and os.path.basename(checkpoint) or ("pretrained" if pretrained else "random weights")
    render_pyramid(crop, [f[0] for f in feats], list(info), out_path, mode=mode,
                   title=f"{model_name} ({weights}), {mode}: {os.path.basename(image)}")
    return out_path


def cmd_plot(args) -> int:
    _check_model(args.model)
    path = make_plot(args.model, args.image, args.out, args.out_indices, args.mode, args.checkpoint,
                     args.pretrained, args.size)
    print(f"wrote {path}")
    return EXIT_OK


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def cmd_bench(args) -> int:
    import torch

    from .extract import build_feature_model, probe_model, resolve_device, resolve_dtype

    _check_model(args.model)
    dtype_name, dtype = resolve_dtype(args.dtype)
    dev = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, indices, cfg, _ = probe_model(args.model, args.out_indices, args.size)
    h, w = args.size or tuple(cfg.input_size[1:])
    model = build_feature_model(args.model, indices).to(device=dev, dtype=dtype)
    x = torch.randn(args.batch_size, cfg.input_size[0], h, w, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    params = sum(p.numel() for p in model.parameters())
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rss_before = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    threads = f"{torch.get_num_threads()} threads" if dev.type == "cpu" else str(dev)
    print(f"{args.model} features, out_indices {indices}, batch {args.batch_size}, {h}x{w}, {dtype_name}, "
          f"{dev.type} ({threads})")
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
    print(_table(rows))
    return EXIT_OK


def sample_image() -> str:
    """Path of matplotlib's ``grace_hopper.jpg`` sample (installed with matplotlib, no network)."""
    try:
        from matplotlib import cbook

        path = cbook.get_sample_data(DEMO_IMAGE, asfileobj=False)
    except (ImportError, OSError, ValueError):
        path = ""
    if not path or not os.path.isfile(path):
        raise UsageError(f"the demo needs matplotlib's sample image {DEMO_IMAGE} (pip install matplotlib)")
    return str(path)


def cmd_demo(args) -> int:
    _check_model(args.model)
    image = sample_image()
    out = Path(args.out)
    features = out / "features"
    png = out / "pyramid.png"
    print(f"== featurezoo info {args.model} ==")
    print_info(args.model)
    print(f"\n== featurezoo extract {args.model} {DEMO_IMAGE} -o {features} --pyramid ==")
    from .extract import load_features

    summary = run_extract(args.model, [image], str(features), progress=False, out_indices="pyramid",
                          batch_size=1, workers=0, checkpoint_path=args.checkpoint, pretrained=args.pretrained,
                          overwrite=True)
    feats = load_features(summary.out_dir)
    for name, t in feats.levels.items():
        print(f"  {name:12} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
    print(f"\n== featurezoo plot {args.model} {DEMO_IMAGE} -o {png} ==")
    make_plot(args.model, image, str(png), "pyramid", "pca", args.checkpoint, args.pretrained)
    print(f"wrote {png}")
    return EXIT_OK


COMMANDS: dict = {"list": cmd_list, "info": cmd_info, "extract": cmd_extract, "plot": cmd_plot,
                  "bench": cmd_bench, "demo": cmd_demo}


def _join_negative_values(argv: List[str]) -> List[str]:
    """``--out-indices -1,-2`` would read as an option; pass it as ``--out-indices=-1,-2``."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--out-indices" and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and argv[i + 1][1:2].isdigit():
            out.append(f"--out-indices={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    model = getattr(args, "model", "")
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"featurezoo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # bad arguments found by the library: unknown model, indices, inputs, OUT
        if args.verbose:
            traceback.print_exc()
        print(f"featurezoo {args.command}: error: {_one_line(e, model)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command == "extract" else ""
        print(f"featurezoo {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, file vanished, ...
        if args.verbose:
            traceback.print_exc()
        print(f"featurezoo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"featurezoo: {level}{msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it is replaced under test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger("featurezoo")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_CliFormatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
