"""``featurezoo plot MODEL IMAGE -o PNG``: one panel per feature level over the input image."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..extract import ExtractError, Preprocess, SkippedImage, build_feature_model, probe_model, weights_setting
from .common import EXIT_OK, add_levels, add_weights, check_model, need, parse_size
from .pyramid import MODES, image_format, render_pyramid

__all__ = ["NAME", "add_parser", "run", "make_plot"]

NAME = "plot"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="one panel per feature level over the input image")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("-o", "--out", required=True, metavar="PNG")
    add_levels(p, "pyramid", "the pyramid")
    p.add_argument("--mode", choices=list(MODES), default="pca",
                   help="pca: first 3 principal components as RGB; mean: channel-mean heatmap (default: pca)")
    add_weights(p)
    p.add_argument("--size", type=parse_size, metavar="H[xW]")
    return p


def make_plot(model_name: str, image: str, out: str, out_indices="pyramid", mode: str = "pca",
              checkpoint: str = "", pretrained: bool = False, size=None) -> Path:
    """Check everything, run the feature model on ``image`` and write the figure to ``out``."""
    out_path = Path(out)
    if out_path.is_dir() or not out_path.parent.is_dir():
        raise ExtractError(f"cannot write the plot to {out}: "
                           f"{'it is a directory' if out_path.is_dir() else 'its folder does not exist'}")
    image_format(out_path)
    info, indices, cfg, _ = probe_model(model_name, out_indices, size)
    weights_setting(checkpoint, pretrained)
    pre = Preprocess.from_cfg(cfg, size)
    try:
        crop = pre.load(image)
    except SkippedImage as e:
        raise ExtractError(f"cannot plot {image}: {e}") from None
    model = build_feature_model(model_name, indices, checkpoint, pretrained, size)
    with torch.inference_mode():
        feats = model(pre.normalize(torch.from_numpy(crop)[None]))
    weights = checkpoint and os.path.basename(checkpoint) or ("pretrained" if pretrained else "random weights")
    render_pyramid(crop, [f[0] for f in feats], list(info), out_path, mode=mode,
                   title=f"{model_name} ({weights}), {mode}: {os.path.basename(image)}")
    return out_path


def run(args: argparse.Namespace) -> int:
    need(NAME, "PIL", "matplotlib")
    check_model(args.model)
    path = make_plot(args.model, args.image, args.out, args.out_indices, args.mode, args.checkpoint,
                     args.pretrained, args.size)
    print(f"wrote {path}")
    return EXIT_OK
