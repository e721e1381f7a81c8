"""MindSpore's ``nn.Unfold`` in PyTorch (HaloNet's halo windows, VOLO's outlook attention).

Layer: part of :mod:`featurezoo.layers`; imports torch only.
"""
from __future__ import annotations

import torch

__all__ = ["extract_image_patches"]


def extract_image_patches(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """MindSpore's ``nn.Unfold`` (``ExtractImagePatches``) with ``valid`` padding and rate 1.

    Returns ``(N, kernel * kernel * C, out_h, out_w)`` whose channel index is
    ``(row * kernel + col) * C + c``: window position major, channel minor
    (MindSpore computes it in NHWC, as TensorFlow), unlike
    ``torch.nn.functional.unfold``'s ``c * kernel * kernel + position``.
    """
    n, c = x.shape[:2]
    windows = x.unfold(2, kernel, stride).unfold(3, kernel, stride)  # N, C, out_h, out_w, k, k
    out_h, out_w = windows.shape[2:4]
    return windows.permute(0, 4, 5, 1, 2, 3).reshape(n, kernel * kernel * c, out_h, out_w)
