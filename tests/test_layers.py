"""MindSpore pad_mode semantics, checked against a direct window-by-window definition."""
import math

import pytest
import torch
import torch.nn.functional as F

from featurezoo.layers import AvgPool2d, Conv2d, MaxPool2d, same_pad


def _windows(size, k, s):
    """MindSpore 'same': out = ceil(size/s) windows, extra padding at the end."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    start = -(total // 2)
    return [(start + i * s, start + i * s + k) for i in range(out)]


def _reference_pool(x, k, s, reduce):
    H, W = x.shape[-2:]
    rows = []
    for (r0, r1) in _windows(H, k, s):
        cols = []
        for (c0, c1) in _windows(W, k, s):
            patch = x[..., max(r0, 0):min(r1, H), max(c0, 0):min(c1, W)]
            cols.append(reduce(patch.flatten(-2), -1))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


@pytest.mark.parametrize("h, w", [(8, 8), (9, 9), (8, 9), (7, 10), (112, 113), (1, 2)])
@pytest.mark.parametrize("k, s", [(3, 2), (2, 2), (3, 1), (5, 2), (3, 3)])
def test_same_pooling_matches_window_definition(h, w, k, s):
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(MaxPool2d(k, s, pad_mode="same")(x),
                               _reference_pool(x, k, s, lambda t, d: t.max(d).values))
    torch.testing.assert_close(AvgPool2d(k, s, pad_mode="same")(x), _reference_pool(x, k, s, torch.mean))


@pytest.mark.parametrize("size", [7, 8, 15, 16, 33])
@pytest.mark.parametrize("k, s, d", [(3, 2, 1), (5, 2, 1), (3, 1, 1), (4, 1, 1), (3, 1, 2), (1, 2, 1)])
def test_same_conv_matches_explicit_padding(size, k, s, d):
    conv = Conv2d(4, 6, k, s, pad_mode="same", dilation=d)
    x = torch.randn(1, 4, size, size)
    (pt, pb) = same_pad(size, k, s, d)
    expected = F.conv2d(F.pad(x, (pt, pb, pt, pb)), conv.weight, None, s, 0, d)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / s)
    torch.testing.assert_close(out, expected)


def test_mindspore_defaults_and_bad_pad_mode():
    conv = Conv2d(3, 8, 3)
    assert conv.bias is None and conv.pad_mode == "same"
    assert Conv2d(3, 8, 3, pad_mode="pad", padding=1, has_bias=True).bias is not None
    with pytest.raises(ValueError, match="pad_mode='spam'.*valid"):
        Conv2d(3, 8, 3, pad_mode="spam")
    with pytest.raises(ValueError, match="needs pad_mode='pad'"):
        MaxPool2d(3, 2, pad_mode="same", padding=1)


@pytest.mark.parametrize("pads", [(0, 1, 0, 1), (1, 2, 0, 0), (0, 0, 2, 1), (1, 1, 1, 1)])
def test_pad2d_equals_f_pad(pads):
    from featurezoo.layers.padding import pad2d

    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(pad2d(x, *pads), F.pad(x, pads))
    torch.testing.assert_close(pad2d(x, *pads, value=float("-inf")), F.pad(x, pads, value=float("-inf")))
