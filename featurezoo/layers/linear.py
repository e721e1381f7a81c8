"""``nn.Linear`` through oneDNN on the CPU, for the inference path.

PyTorch computes a float32 ``nn.Linear`` on the CPU with its BLAS (MKL in the
official builds), and convolutions with oneDNN. On CPUs where MKL does not take
its best code path (on AMD EPYC with AVX-512, two threads, ViT-B's layers ran at
161-179 GFLOP/s where oneDNN's own matrix kernels reach 293-386; ``benchmarks/bench_linear.py``),
the transformer families spend most of their time in those matrix products.
``OneDnnLinear`` is an ``nn.Linear`` (same parameters, same state dict, same
``weight`` for any code that reads it) whose forward calls oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` uses for
bfloat16 linears) when that can give the same float32 result: a float32 input
on the CPU, no autocast, no gradient. Otherwise it is ``F.linear``.

:func:`onednn_linear_faster` decides per process, by timing the two kernels on
one layer shape, whether the swap pays off on this CPU.
"""
from __future__ import annotations

import functools
import logging
import statistics
import time
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OneDnnLinear", "onednn_linear", "onednn_linear_available", "onednn_linear_faster", "use_onednn_linears"]

_logger = logging.getLogger(__name__)


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN and its linear operator."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN's kernel (float32 on the CPU; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` computed by oneDNN where that gives the same float32 result (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.dim() >= 2 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return onednn_linear(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _timed_choice(threads: int, shape: Tuple[int, int, int]) -> bool:
    rows, cols_in, cols_out = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols_in, generator=gen)
    w = torch.randn(cols_out, cols_in, generator=gen)
    b = torch.randn(cols_out, generator=gen)
    with torch.inference_mode():
        aten = _median_seconds(lambda: F.linear(x, w, b), 5)
        onednn = _median_seconds(lambda: onednn_linear(x, w, b), 5)
    _logger.info("linear %s on %d threads: aten %.2f ms, oneDNN %.2f ms", shape, threads, aten * 1e3, onednn * 1e3)
    # A clear margin: where the two are equal the plain kernel is kept.
    return onednn < 0.9 * aten


def onednn_linear_faster(shape: Tuple[int, int, int] = (784, 384, 1536)) -> bool:
    """Whether oneDNN's float32 linear beats ``F.linear`` by 10% on this CPU at this thread count.

    Timed once per process and thread count (about 20 ms) on a ``(rows, in, out)`` layer
    (default: a 384 -> 1536 MLP layer on 784 tokens, as in ConvNeXt-T and Swin-T).
    """
    if not onednn_linear_available():
        return False
    return _timed_choice(torch.get_num_threads(), tuple(shape))


def use_onednn_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` (not subclasses, whose forward may differ) into a
    :class:`OneDnnLinear`, in place (same module objects, same parameters); returns how many."""
    count = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDnnLinear
            count += 1
    return count
