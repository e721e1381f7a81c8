"""Channel split as MindCV's ``layers.compatibility.Split``, kept as a module of its own.

MindCV holds its ``ops.split`` in a parameterless cell (``split``) of the
blocks that use it (Res2Net, Selective Kernel, EdgeNeXt); keeping it as a
child keeps their module trees MindCV's.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["Split"]


class Split(nn.Module):
    """``torch.split(x, split_size, dim)`` into ``output_num`` chunks of ``split_size``.

    >>> [t.shape[1] for t in Split(2, 3, axis=1)(torch.zeros(1, 6, 1, 1))]
    [2, 2, 2]
    """

    def __init__(self, split_size_or_sections: int, output_num: int, axis: int = 0):
        super().__init__()
        self.split_size = split_size_or_sections
        self.output_num = output_num
        self.axis = axis

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        chunks = torch.split(x, self.split_size, dim=self.axis)
        # (Under torch.fx tracing the chunks are one Proxy: index it, do not count it.)
        if isinstance(chunks, torch.fx.Proxy):
            return tuple(chunks[i] for i in range(self.output_num))
        if len(chunks) != self.output_num:
            raise ValueError(
                f"Split: {x.shape[self.axis]} channels in chunks of {self.split_size} give {len(chunks)} "
                f"chunks, expected {self.output_num}"
            )
        return chunks

    def extra_repr(self) -> str:
        return f"split_size={self.split_size}, output_num={self.output_num}, axis={self.axis}"
