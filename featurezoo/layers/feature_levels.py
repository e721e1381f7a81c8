"""Building ``feature_info`` with one entry per distinct reduction.

For families that MindCV gives no ``feature_info``, featurezoo registers one
entry at each reduction, at the last layer that still outputs that
resolution (the end of the stage). Families call :func:`note_feature` after
each layer (or stage) they build, with the values the loop computed; a layer
at the same reduction as the previous entry replaces it.
"""
from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["note_feature"]


def note_feature(feature_info: List[Dict[str, Any]], chs: int, reduction: int, name: str) -> None:
    """Record ``name`` as the feature map at ``reduction``, replacing an earlier
    entry at the same reduction (so the list keeps the last layer of each).

    >>> info = []
    >>> for chs, reduction, name in ((16, 2, "stem"), (16, 2, "blocks.0"), (24, 4, "blocks.1")):
    ...     note_feature(info, chs, reduction, name)
    >>> [(e["name"], e["reduction"]) for e in info]
    [('blocks.0', 2), ('blocks.1', 4)]
    """
    entry = dict(chs=chs, reduction=reduction, name=name)
    if feature_info and feature_info[-1]["reduction"] == reduction:
        feature_info[-1] = entry
    elif feature_info and feature_info[-1]["reduction"] > reduction:
        last = feature_info[-1]
        raise ValueError(f"note_feature: {name!r} has reduction {reduction}, below {last['reduction']} of the "
                         f"previous entry {last['name']!r}; layers must be noted in the order they run")
    else:
        feature_info.append(entry)
