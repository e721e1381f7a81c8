"""The ``featurezoo`` command: inspect backbones and extract multi-scale features.

    featurezoo list [PATTERN] [--features-only]
    featurezoo info MODEL [--size H[xW]]
    featurezoo extract MODEL INPUT... -o OUT [--out-indices 1,2,3 | --pyramid] [--pool none|avg|max] ...
    featurezoo plot MODEL IMAGE -o pyramid.png
    featurezoo bench MODEL [--batch-size N] [--size H[xW]] [--dtype ...]
    featurezoo export MODEL -o model.onnx [--out-indices ...] [--size H[xW]] [--checkpoint PATH]
    featurezoo demo [--out DIR]

One module per verb (``list_cmd``, ``info``, ``extract``, ``plot``, ``bench``,
``export``, ``demo``), each with ``add_parser(sub)`` and ``run(args) -> int``; shared
argument pieces in :mod:`.common`. Errors in the arguments print one line and
exit with status 2, before anything is written; so does a missing optional
package (``pip install 'featurezoo[cli]'``).

Layer: application (imports the library and :mod:`featurezoo.extract`).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

from .. import __version__
from .._optional import MissingDependency
from . import bench, demo, export, extract, info, list_cmd, plot
from .common import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Parser, UsageError, one_line,
                     parse_out_indices, parse_size)

__all__ = ["main", "build_parser", "parse_size", "parse_out_indices", "UsageError", "COMMANDS", "EXIT_OK",
           "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED"]

# The verbs, in the order `featurezoo --help` lists them: name -> module with add_parser(sub) and run(args).
COMMANDS = {m.NAME: m for m in (list_cmd, info, extract, plot, bench, export, demo)}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="featurezoo", description="Vision backbones with multi-scale feature extraction.")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log more (each skipped image, resumes, worker choice; tracebacks of errors)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    model = getattr(args, "model", "")
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        print(f"featurezoo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MissingDependency as e:  # "featurezoo extract needs Pillow: pip install 'featurezoo[cli]'"
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # bad arguments found by the library: unknown model, indices, inputs, OUT
        if args.verbose:
            traceback.print_exc()
        print(f"featurezoo {args.command}: error: {one_line(e, model)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command == "extract" else ""
        print(f"featurezoo {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, file vanished, ...
        if args.verbose:
            traceback.print_exc()
        print(f"featurezoo {args.command}: error: {one_line(e)}", file=sys.stderr)
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
