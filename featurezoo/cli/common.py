"""Pieces every verb of the ``featurezoo`` command shares: the parser class, argument
types and groups, exit codes, the one-line error, table formatting."""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional, Sequence, Tuple, Union

from .._optional import require
from ..discovery import import_factory, is_factory_path
from ..registry import model_entrypoint

__all__ = ["UsageError", "Parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "parse_size",
           "parse_out_indices", "join_out_indices", "positive_int", "nonneg_int", "positive_float", "nonneg_float",
           "workers", "add_levels", "add_weights", "need", "check_model", "table", "mparams", "gflops", "hw", "plural",
           "one_line"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command line; printed as one line, exit status 2."""


# -- --out-indices: "1,2,3", "1 2 3", "-1 -2", "-2,-1" --------------------------------------------------
OUT_INDICES = "--out-indices"
_INDEX_LIST = re.compile(r"^,*-?\d+(?:,+-?\d+)*,*$")


def _is_out_indices_flag(arg: str) -> bool:
    # argparse accepts unambiguous prefixes (--out-i); "--out" alone is -o/--out
    return len(arg) > len("--out-") and OUT_INDICES.startswith(arg)


def join_out_indices(argv: Sequence[str]) -> List[str]:
    """Pass the integer lists after ``--out-indices`` as one ``--out-indices=I,J,...`` item.

    So ``--out-indices 1 2 3`` and ``--out-indices -1 -2`` mean ``1,2,3`` and
    ``-1,-2``; a value argparse would take for an option (``-2,-1``) is kept a
    value; and the indices end where the first non-integer item (an INPUT) starts.
    """
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if _is_out_indices_flag(arg):
            j = i + 1
            while j < len(argv) and _INDEX_LIST.match(argv[j]):
                j += 1
            if j > i + 1:
                out.append(f"{OUT_INDICES}={','.join(argv[i + 1:j])}")
                i = j
                continue
        out.append(arg)
        i += 1
    return out


class Parser(argparse.ArgumentParser):
    """Errors raise :class:`UsageError` (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        args = join_out_indices(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)


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
    """``"1,2,3"``, ``"1 2 3"``, ``"-1"``, ``"all"`` or ``"pyramid"``."""
    if text in ("all", "pyramid"):
        return None if text == "all" else "pyramid"
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"out-indices must be comma- or space-separated integers (e.g. 1,2,3, "
                                         f"1 2 3 or -1), 'all' or 'pyramid', got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def workers(text: str) -> Optional[int]:
    return None if text == "auto" else nonneg_int(text)


def add_levels(p: argparse.ArgumentParser, default: Union[List[int], str, None], what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(OUT_INDICES, type=parse_out_indices, default=default, metavar="I,J,...",
                   help=f"feature levels: indices into feature_info, comma- or space-separated (negative count "
                        f"from the end), or 'all'; default: {what}")
    g.add_argument("--pyramid", dest="out_indices", action="store_const", const="pyramid",
                   help="the last level at each distinct reduction (the detector pyramid)")


def add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", default="", metavar="PATH",
                   help="weights to load (.ckpt, .pt/.pth/.bin, .safetensors); default: random initialisation")
    g.add_argument("--pretrained", action="store_true", help="download (once) and load the published weights")


# -- checks -------------------------------------------------------------------------------------------
def need(verb: str, *modules: str) -> None:
    """Fail with ``featurezoo VERB needs PACKAGE: pip install 'featurezoo[cli]'`` unless ``modules`` import."""
    for module in modules:
        require(module, "cli", f"featurezoo {verb}")


def check_model(name: str) -> None:
    """A registered name (``ValueError`` naming close matches) or an importable factory ``pkg.module:fn``."""
    if is_factory_path(name):
        import_factory(name)
    else:
        model_entrypoint(name)


# -- formatting ---------------------------------------------------------------------------------------
def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [str(v).rjust(w) if c in right else str(v).ljust(w) for c, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def mparams(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def gflops(n: int) -> str:
    g = n / 1e9
    return f"{g:.3f}" if g < 1 else f"{g:.2f}" if g < 100 else f"{g:.0f}"


def hw(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def one_line(e: BaseException, model: str = "") -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    first = lines[0].rstrip(": ")
    if len(lines) > 1 and "out_indices" in first and model:
        first += f" (run `featurezoo info {model}` for the levels)"
    return first
