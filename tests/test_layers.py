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


@pytest.mark.parametrize("h, w, k, s, groups, channels_last", [
    (16, 15, 3, (2, 2), 4, False), (16, 16, 5, (2, 1), 4, True), (9, 12, (3, 5), (3, 2), 1, False),
    (14, 14, 3, (2, 2), 1, True),
])
def test_same_conv_asymmetric_in_one_call(h, w, k, s, groups, channels_last):
    # The asymmetric case pads symmetrically and drops leading windows: same numbers as an explicit pad,
    # for non-square inputs, per-axis strides, depthwise groups, a bias and channels-last inputs.
    conv = Conv2d(4, 8, k, s, group=groups, has_bias=True)
    x = torch.randn(2, 4, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kh, kw = conv.kernel_size
    (pt, pb), (pl, pr) = same_pad(h, kh, s[0]), same_pad(w, kw, s[1])
    expected = F.conv2d(F.pad(x, (pl, pr, pt, pb)), conv.weight, conv.bias, s, 0, 1, groups)
    torch.testing.assert_close(conv(x), expected)


def test_inplace_swish_equals_silu_and_trains():
    from featurezoo.layers.activation import Swish

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    y = torch.nn.BatchNorm2d(3)(x)
    expected = y * torch.sigmoid(y)
    out = Swish(inplace=True)(y)
    torch.testing.assert_close(out.detach(), expected.detach())
    out.sum().backward()  # in place on a norm's output keeps the graph valid
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_tanh_gelu_equals_torch(inplace):
    from featurezoo.layers.activation import GELU

    x = torch.randn(3, (1 << 17) // 3 + 41) * 4  # more than one chunk, the last one partial
    expected = F.gelu(x, approximate="tanh")
    y = x.clone()
    with torch.inference_mode():
        out = GELU(approximate="tanh", inplace=inplace)(y)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    assert (out.data_ptr() == y.data_ptr()) is inplace
    w = x.clone().requires_grad_()  # autograd: torch's kernel, not in place
    out = GELU(approximate="tanh", inplace=True)(w)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
