"""The benchmark's CPU peak-memory measurement (allocation events replayed in order) on a forward whose
peak is known: two 4 MB tensors live at once, then one freed and one returned."""
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py"
    spec = importlib.util.spec_from_file_location("bench_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TwoTemporaries(nn.Module):
    def forward(self, x):
        y = x * 2  # 4 MB
        z = y + 1  # 4 MB more: the peak, 8 MB
        del y
        return z.mul_(3)  # in place: nothing more


class _InPlace(nn.Module):
    def forward(self, x):
        return (x * 2).add_(1).mul_(3)  # one 4 MB tensor throughout


def test_peak_forward_bytes_replays_allocations_in_order():
    bench = _bench()
    x = torch.randn(1000, 1000)  # 4,000,000 bytes, existing before: not counted
    peaks = [bench.peak_forward_bytes(m, x) for m in (_TwoTemporaries(), _InPlace())]
    # A few bytes of scalar wrappers may be allocated besides.
    assert 8_000_000 <= peaks[0] < 8_000_000 + 4096, peaks
    assert 4_000_000 <= peaks[1] < 4_000_000 + 4096, peaks
