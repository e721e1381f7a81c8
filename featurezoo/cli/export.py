"""``featurezoo export MODEL -o model.onnx``: an ONNX file with one named output per feature level."""
from __future__ import annotations

import argparse

from .._optional import require
from ..onnx_export import export_onnx
from .common import EXIT_OK, add_levels, add_weights, check_model, parse_size, positive_int, table

__all__ = ["NAME", "add_parser", "run"]

NAME = "export"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="export a feature model to ONNX (one named output per level, dynamic batch)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--size", type=parse_size, metavar="H[xW]",
                   help="the input size the graph is built for (default: 64 px or the model's only size)")
    p.add_argument("--batch-size", type=positive_int, default=2, metavar="N",
                   help="the example batch (the batch axis is dynamic anyway; default 2)")
    p.add_argument("--optimize", action="store_true",
                   help="run onnxscript's graph optimiser on the file (onnxruntime optimises it at load anyway)")
    add_levels(p, None, "all levels")
    add_weights(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_model(args.model)
    require("onnxscript", "onnx", "featurezoo export")
    info = export_onnx(args.model, args.output, out_indices=args.out_indices, size=args.size,
                       batch_size=max(2, args.batch_size), checkpoint_path=args.checkpoint,
                       pretrained=args.pretrained, optimize=args.optimize)
    h, w = info["size"]
    print(f"{args.output}: input {info['input']} (N, 3, {h}, {w}), batch dynamic")
    rows = [("output", "channels", "stride")] + [(n, str(c), str(r)) for n, (c, r) in info["outputs"].items()]
    print(table(rows, right=(1, 2)))
    return EXIT_OK
