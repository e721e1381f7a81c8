"""Multi-scale levels for plain (isotropic) models, derived without weights.

A plain model (ViT, MAE, CaiT, ConViT, XCiT, MLP-Mixer) computes every block
at one stride, its patch size. Detectors want strides 4/8/16/32; ViTDet
(`Li et al. 2022 <https://arxiv.org/abs/2203.16527>`_) builds them from the
last block alone. This module gives that pyramid in its parameter-free form:
finer levels by bilinear interpolation of the last block's map
(``align_corners=False``), coarser ones by 2x2 max pooling (ViTDet's own
stride-32 path; ``ceil_mode``, so an odd grid keeps its last row and a 1x1
grid stays 1x1, where detectron2 floors on inputs it pads to multiples of
32, which agree), so any plain model serves
``out_indices="pyramid"`` with no new weights. The learned version is
:class:`featurezoo.necks.SimpleFeaturePyramid`.

A plain model's ``feature_info`` (:func:`plain_feature_info`) is one entry
per block at the patch stride, marked ``native=True``, plus the derived
entries, ``native=False``, named ``<last block>@<stride>``. The derived
entries finer than the patch stride sit just before the last block's entry
and the coarser ones after it, because ``"pyramid"`` picks the last entry at
each reduction in index order; for a ViT-B/16::

    0..10   blocks.0 .. blocks.10   768 @ 16   native
    11      blocks.11@4             768 @ 4    derived (x4 bilinear)
    12      blocks.11@8             768 @ 8    derived (x2 bilinear)
    13      blocks.11               768 @ 16   native: the last block
    14      blocks.11@32            768 @ 32   derived (2x2 max pool)

so ``"pyramid"`` is ``[11, 12, 13, 14]``: strides 4, 8, 16, 32 with the last
block itself at 16. Derived entries are part of "all" (``out_indices=None``
returns every entry, as for every model), and ``out_indices=[-1]`` is the
coarsest derived entry, not the last block. Only targets whose ratio to the
patch stride is a power of two are derived (patch 32: 4, 8, 16; patch 14:
none, since 14 px tokens cannot be resampled onto a stride-4/8/16/32 grid
without moving them).

A model uses :func:`level_blocks` to know which block each entry comes from
and :func:`plain_levels` to turn the block maps it computed into the
requested entries. A model whose blocks run at two or more strides (VOLO)
uses :func:`staged_feature_info`, :func:`level_sources` and
:func:`staged_levels` the same way.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .fx_calls import fx_call

__all__ = ["PYRAMID_STRIDES", "derived_strides", "plain_feature_info", "level_blocks", "derive_level",
           "plain_levels", "staged_feature_info", "level_sources", "staged_levels"]

PYRAMID_STRIDES = (4, 8, 16, 32)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def derived_strides(native: int, targets: Sequence[int] = PYRAMID_STRIDES) -> List[int]:
    """The ``targets`` other than ``native`` that a power-of-two resampling of the native map reaches.

    >>> derived_strides(16), derived_strides(32), derived_strides(14)
    ([4, 8, 32], [4, 8, 16], [])
    """
    out = []
    for t in sorted(set(targets)):
        if t == native:
            continue
        ratio, rem = divmod(max(t, native), min(t, native))
        if rem == 0 and _is_power_of_two(ratio):
            out.append(t)
    return out


def plain_feature_info(chs: int, stride: int, names: Sequence[str],
                       targets: Sequence[int] = PYRAMID_STRIDES) -> List[Dict[str, Any]]:
    """``feature_info`` of a plain model whose blocks ``names`` (in run order) all output ``chs``
    channels at ``stride``, with the parameter-free pyramid levels derived from the last block
    (see the module docstring for the order).

    >>> [(e["name"], e["reduction"], e["native"]) for e in plain_feature_info(8, 16, ["b.0", "b.1"])]
    [('b.0', 16, True), ('b.1@4', 4, False), ('b.1@8', 8, False), ('b.1', 16, True), ('b.1@32', 32, False)]
    """
    if not names:
        raise ValueError("plain_feature_info: a plain model needs at least one block")
    last = names[-1]
    derived = derived_strides(stride, targets)
    info = [dict(chs=chs, reduction=stride, name=n, native=True) for n in names[:-1]]
    info += [dict(chs=chs, reduction=t, name=f"{last}@{t}", native=False) for t in derived if t < stride]
    info.append(dict(chs=chs, reduction=stride, name=last, native=True))
    info += [dict(chs=chs, reduction=t, name=f"{last}@{t}", native=False) for t in derived if t > stride]
    return info


def level_blocks(feature_info: Sequence[Mapping[str, Any]]) -> List[int]:
    """For each entry of a :func:`plain_feature_info` list, the index of the block it is (or derives from)."""
    native = [i for i, e in enumerate(feature_info) if e["native"]]
    last = len(native) - 1
    block_of = {pos: b for b, pos in enumerate(native)}
    return [block_of.get(i, last) for i in range(len(feature_info))]


def derive_level(x: torch.Tensor, from_stride: int, to_stride: int) -> torch.Tensor:
    """A NCHW map at ``from_stride`` resampled to ``to_stride`` without weights: bilinear
    interpolation by the exact integer factor up, 2x2 max pools (rounding up) down."""
    if to_stride == from_stride:
        return x
    if to_stride < from_stride:
        factor = from_stride // to_stride
        return F.interpolate(x, size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="bilinear",
                             align_corners=False)
    for _ in range((to_stride // from_stride).bit_length() - 1):
        x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    return x


def plain_levels(feature_info: Sequence[Mapping[str, Any]], indices: Sequence[int],
                 maps: Mapping[int, torch.Tensor]) -> List[torch.Tensor]:
    """The entries ``indices`` (ascending) from the NCHW block maps ``maps`` ({block index: map},
    holding every block :func:`level_blocks` names for them)."""
    blocks = level_blocks(feature_info)
    native_stride = next(e["reduction"] for e in feature_info if e["native"])
    out = []
    for i in indices:
        x = maps[blocks[i]]
        entry = feature_info[i]
        out.append(x if entry["native"] else derive_level(x, native_stride, entry["reduction"]).contiguous())
    return out


# -- models whose blocks run at more than one stride (VOLO: outlookers at 8, transformer blocks at 16) --


def staged_feature_info(stages: Sequence[Tuple[int, int, Sequence[str]]],
                        targets: Sequence[int] = PYRAMID_STRIDES) -> List[Dict[str, Any]]:
    """``feature_info`` of a model whose blocks run at several strides: ``stages`` lists
    ``(chs, stride, block names)`` in run order, strides increasing. One native entry per block, plus
    each target no stage has, derived (:func:`derive_level`) from one stage's last block: the coarsest
    stage finer than the target (pooled down; placed just after that block), or, for a target finer
    than every stage, the first stage (interpolated up; placed just before its last block). So
    ``"pyramid"`` stays in increasing strides. With one stage this is :func:`plain_feature_info`.

    >>> info = staged_feature_info([(4, 8, ["a.0", "a.1"]), (6, 16, ["b.0", "b.1"])])
    >>> [(e["name"], e["chs"], e["reduction"], e["native"]) for e in info]  # doctest: +NORMALIZE_WHITESPACE
    [('a.0', 4, 8, True), ('a.1@4', 4, 4, False), ('a.1', 4, 8, True), ('b.0', 6, 16, True),
     ('b.1', 6, 16, True), ('b.1@32', 6, 32, False)]
    """
    if not stages or any(not names for _, _, names in stages):
        raise ValueError("staged_feature_info: every stage needs at least one block")
    strides = [s for _, s, _ in stages]
    if any(a >= b for a, b in zip(strides, strides[1:])):
        raise ValueError(f"staged_feature_info: stage strides must increase, got {strides}")
    before: Dict[int, List[int]] = {k: [] for k in range(len(stages))}
    after: Dict[int, List[int]] = {k: [] for k in range(len(stages))}
    for t in sorted(set(targets)):
        if t in strides:
            continue
        finer = [k for k, s in enumerate(strides) if s < t]
        k = finer[-1] if finer else 0
        ratio, rem = divmod(max(t, strides[k]), min(t, strides[k]))
        if rem == 0 and _is_power_of_two(ratio):
            (after if finer else before)[k].append(t)
    info: List[Dict[str, Any]] = []
    for k, (chs, stride, names) in enumerate(stages):
        last = names[-1]
        info += [dict(chs=chs, reduction=stride, name=n, native=True) for n in names[:-1]]
        info += [dict(chs=chs, reduction=t, name=f"{last}@{t}", native=False) for t in before[k]]
        info.append(dict(chs=chs, reduction=stride, name=last, native=True))
        info += [dict(chs=chs, reduction=t, name=f"{last}@{t}", native=False) for t in after[k]]
    return info


def level_sources(feature_info: Sequence[Mapping[str, Any]]) -> List[int]:
    """For each entry of a :func:`staged_feature_info` (or :func:`plain_feature_info`) list, the index of
    the block (in run order) it is or derives from; a derived entry is named ``<block>@<stride>``."""
    block_of = {e["name"]: b for b, e in enumerate(e for e in feature_info if e["native"])}
    return [block_of[e["name"] if e["native"] else e["name"].rpartition("@")[0]] for e in feature_info]


@fx_call
def crop_to_input(x: torch.Tensor, input_hw: Sequence[int], stride: int) -> torch.Tensor:
    """The ``ceil(size / stride)`` first rows and columns of the stride-``stride`` map ``x``: those that lie on
    an ``input_hw`` image."""
    return x[..., :-(-int(input_hw[0]) // stride), :-(-int(input_hw[1]) // stride)]


def staged_levels(feature_info: Sequence[Mapping[str, Any]], indices: Sequence[int],
                  maps: Mapping[int, torch.Tensor], input_hw: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """The entries ``indices`` (ascending) from the NCHW block maps ``maps`` ({block index: map}, holding
    every block :func:`level_sources` names for them). With ``input_hw``, an interpolated level keeps only
    the ``ceil(size / stride)`` rows and columns that lie on the image (a model whose maps are
    ``ceil(size / stride)``: 2 x ceil(67 / 8) = 18 rows at stride 4, of which 17 cover the 67 px)."""
    sources = level_sources(feature_info)
    native = [e for e in feature_info if e["native"]]
    out = []
    for i in indices:
        b, entry = sources[i], feature_info[i]
        x = maps[b]
        if not entry["native"]:
            r = entry["reduction"]
            x = derive_level(x, native[b]["reduction"], r)
            if input_hw is not None and r < native[b]["reduction"]:
                x = crop_to_input(x, input_hw, r)
            x = x.contiguous()
        out.append(x)
    return out
