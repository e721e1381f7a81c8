"""``featurezoo info MODEL``: feature levels, output sizes, parameters, FLOPs and the input cfg."""
from __future__ import annotations

import argparse
from typing import Optional, Tuple

from ..extract import Preprocess
from .common import EXIT_OK, add_levels, check_model, gflops, hw, mparams, parse_size, table
from .report import model_report

__all__ = ["NAME", "add_parser", "run", "print_info"]

NAME = "info"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="a model's feature levels, output sizes, parameters, FLOPs, input cfg")
    p.add_argument("model")
    p.add_argument("--size", type=parse_size, metavar="H[xW]", help="input size (default: the model's cfg)")
    add_levels(p, None, "also report the usual choices")
    return p


def print_info(name: str, size: Optional[Tuple[int, int]] = None, out_indices=None) -> None:
    rep = model_report(name, size, out_indices)
    cfg = rep.cfg
    pre = Preprocess.from_cfg(cfg, rep.size)
    h, w = rep.size
    print(f"{name}: input {cfg.input_size[0]}x{h}x{w}" + ("" if size is None else f" (cfg: {hw(cfg.input_size)})"))
    print(f"preprocessing: resize to cover {hw(pre.resize)} ({cfg.interpolation}, crop_pct {cfg.crop_pct}), "
          f"centre crop {h}x{w}, mean {tuple(cfg.mean)}, std {tuple(cfg.std)}")
    print(f"pretrained weights: {cfg.url or 'none published'}")
    print()
    rows = [("index", "name", "channels", "reduction", f"output at {h}x{w}", "params held", "GFLOPs")]
    for lv in rep.levels:
        rows.append((str(lv.index), lv.name, str(lv.chs), str(lv.reduction), hw(lv.shape[1:]),
                     mparams(lv.params), gflops(lv.flops)))
    print(table(rows, right=(0, 2, 3, 5, 6)))
    print("(params held / GFLOPs: the feature model whose deepest output is that level)")
    print()
    rows = [("out_indices", "levels", "params held", "GFLOPs")]
    for c in rep.choices:
        rows.append((c.label, "-" if c.indices is None else ",".join(str(i) for i in c.indices),
                     mparams(c.params), gflops(c.flops)))
    print(table(rows, right=(2, 3)))
    print("(GFLOPs at batch 1, counted by torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add)")


def run(args: argparse.Namespace) -> int:
    check_model(args.model)
    print_info(args.model, args.size, args.out_indices)
    return EXIT_OK
