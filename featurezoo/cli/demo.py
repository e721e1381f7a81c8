"""``featurezoo demo``: info, extraction and plot of matplotlib's sample image (no network; ``make demo``)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .._optional import require
from ..extract import load_features
from .common import EXIT_OK, UsageError, add_weights, check_model, need
from .extract import run_extract
from .info import print_info
from .plot import make_plot

__all__ = ["NAME", "add_parser", "run", "sample_image", "DEMO_MODEL", "DEMO_IMAGE"]

NAME = "demo"
DEMO_MODEL = "resnet50"
DEMO_IMAGE = "grace_hopper.jpg"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="info, extraction and plot of the built-in sample image (no network)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="default: ./demo_out")
    p.add_argument("--model", default=DEMO_MODEL, help=f"default: {DEMO_MODEL}")
    add_weights(p)
    return p


def sample_image() -> str:
    """Path of matplotlib's ``grace_hopper.jpg`` sample (installed with matplotlib, no network)."""
    cbook = require("matplotlib.cbook", "cli", f"featurezoo {NAME}")
    try:
        path = cbook.get_sample_data(DEMO_IMAGE, asfileobj=False)
    except (OSError, ValueError):
        path = ""
    if not path or not os.path.isfile(path):
        raise UsageError(f"the demo needs matplotlib's sample image {DEMO_IMAGE}, which this matplotlib "
                         f"installation lacks")
    return str(path)


def run(args: argparse.Namespace) -> int:
    need(NAME, "PIL", "matplotlib")
    check_model(args.model)
    image = sample_image()
    out = Path(args.out)
    features = out / "features"
    png = out / "pyramid.png"
    print(f"== featurezoo info {args.model} ==")
    print_info(args.model)
    print(f"\n== featurezoo extract {args.model} {DEMO_IMAGE} -o {features} --pyramid ==")
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
