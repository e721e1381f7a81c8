"""The figure of ``featurezoo plot``: one panel per feature level over the input image.

Each level is shown either as its first three principal components mapped to
RGB (``pca``: regions the backbone represents alike get alike colours) or as
its channel-mean heatmap (``mean``). Drawn with matplotlib's Agg canvas
directly, so no pyplot state and no GUI backend is touched. Pillow and
matplotlib (the ``cli`` extra) are imported when a figure is drawn.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
import torch

from .._optional import require
from ..atomic import atomic_write

__all__ = ["pca_rgb", "mean_heatmap", "render_pyramid", "image_format", "MODES"]

MODES = ("pca", "mean")


def _robust_unit(v: torch.Tensor) -> torch.Tensor:
    """Scale each column to [0, 1] between its 1st and 99th percentile."""
    lo = torch.quantile(v, 0.01, dim=0, keepdim=True)
    hi = torch.quantile(v, 0.99, dim=0, keepdim=True)
    return ((v - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def pca_rgb(feat: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` features to an ``(H, W, 3)`` float image of their first 3 principal components."""
    c, h, w = feat.shape
    x = feat.detach().float().cpu().reshape(c, h * w).T  # (HW, C): one sample per position
    x = x - x.mean(dim=0, keepdim=True)
    rgb = torch.zeros(h * w, 3)
    if h * w > 1 and c > 0:
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        comps = vh[:3]
        # An eigenvector's sign is arbitrary: make each one's largest loading positive, so plots are reproducible.
        signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        proj = x @ comps.T
        rgb[:, :proj.shape[1]] = _robust_unit(proj)
    return rgb.reshape(h, w, 3).numpy()


def mean_heatmap(feat: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` features to an ``(H, W)`` map in [0, 1] of the channel mean."""
    m = feat.detach().float().cpu().mean(dim=0)
    return _robust_unit(m.reshape(-1, 1)).reshape(m.shape).numpy()


def _upsample(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Float map in [0, 1] (``(h, w)`` or ``(h, w, 3)``) resized bilinearly to ``size`` = (H, W)."""
    Image = require("PIL.Image", "cli", "featurezoo plot")
    u8 = (arr * 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((size[1], size[0]), Image.Resampling.BILINEAR)) / 255.0


def image_format(path) -> str:
    """The image format matplotlib writes for ``path``'s suffix (``png`` without one); ``ValueError`` if none."""
    require("matplotlib", "cli", "featurezoo plot")
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"cannot write the plot to {os.fspath(path)}: format {fmt!r} is not supported; "
                         f"use one of {', '.join(sorted(formats))}")
    return fmt


def render_pyramid(image: np.ndarray, feats: Sequence[torch.Tensor], levels: Sequence[Mapping], path,
                   mode: str = "pca", title: str = "", alpha: float = 0.65) -> None:
    """Save a figure: the input ``image`` (uint8 ``(H, W, 3)``) then one panel per level.

    ``feats`` are ``(C, h, w)`` tensors; ``levels`` the matching feature_info
    entries (``name``, ``chs``, ``reduction``).
    """
    if mode not in MODES:
        raise ValueError(f"plot mode {mode!r} is not valid; use one of {', '.join(MODES)}")
    require("PIL.Image", "cli", "featurezoo plot")
    require("matplotlib", "cli", "featurezoo plot")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(feats) + 1
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4 * ncols, 4.3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    h, w = image.shape[:2]
    axes[0].imshow(image)
    axes[0].set_title(f"input {h}x{w}")
    for ax, feat, level in zip(axes[1:], feats, levels):
        if mode == "pca":
            overlay = _upsample(pca_rgb(feat), (h, w))
        else:
            overlay = colormaps["inferno"](_upsample(mean_heatmap(feat), (h, w)))[..., :3]
        ax.imshow(image)
        ax.imshow(overlay, alpha=alpha)
        ax.set_title(f"{level['name']}: {level['chs']} ch, /{level['reduction']} ({feat.shape[1]}x{feat.shape[2]})")
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fmt = image_format(path)
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, dpi=90)
