"""``featurezoo list [PATTERN] [--features-only]``: models, their parameters, levels, reductions, weights."""
from __future__ import annotations

import argparse

from ..registry import list_models
from .common import EXIT_OK, UsageError, mparams, table
from .report import model_row

__all__ = ["NAME", "add_parser", "run"]

NAME = "list"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="models: parameters, feature levels, reductions, pretrained weights")
    p.add_argument("pattern", nargs="?", help="shell-style wildcard, e.g. 'resnet*'")
    p.add_argument("--features-only", action="store_true", help="only models that support features_only")
    return p


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"no model matches {args.pattern!r}; run `featurezoo list` for all models")
    rows = [("name", "params", "levels", "reductions", "pretrained")]
    for name in names:
        r = model_row(name)
        if args.features_only and r.levels is None:
            continue
        rows.append((r.name, mparams(r.params), "-" if r.levels is None else str(r.levels),
                     ",".join(str(x) for x in r.reductions) or "-", "yes" if r.pretrained else "no"))
    print(table(rows, right=(1, 2)))
    print(f"\n{len(rows) - 1} models; params of the feature model with every level "
          f"(`featurezoo info MODEL` for details)")
    return EXIT_OK
