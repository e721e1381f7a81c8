"""EfficientNet family checks beyond the generic contract and MindCV parity tests."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.models.efficientnet import FusedMBConv, MBConv

TIMM_TWINS = [("efficientnet_b0", "efficientnet_b0"), ("efficientnet_v2_s", "efficientnetv2_s")]


@pytest.mark.parametrize("name, timm_name", TIMM_TWINS)
def test_pyramid_agrees_with_timm(name, timm_name):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid").feature_info
        full_info = fz.create_model(name).feature_info
        timm_full = timm.create_model(timm_name, pretrained=False)
    theirs = timm.create_model(timm_name, features_only=True, pretrained=False).feature_info
    assert ours.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    # Deliberate difference, kept from MindCV: its feature_info ends with the 1x1 head conv, so the
    # pyramid's stride-32 level is that conv (timm's num_features) rather than timm's last stage.
    assert ours.channels()[:-1] == theirs.channels()[:-1]
    assert ours.channels()[-1] == timm_full.num_features
    assert ours.module_name(-1) == full_info[-1]["name"]
    # ...and the last stage itself, one entry earlier, is timm's stride-32 level.
    last_stage = full_info[len(full_info) - 2]
    assert (last_stage["chs"], last_stage["reduction"]) == (theirs.channels()[-1], theirs.reduction()[-1])


@pytest.mark.parametrize("name, bn_eps, bn_momentum", [
    ("efficientnet_b4", 1e-5, 0.1),   # MindSpore defaults (momentum 0.9 there)
    ("efficientnet_b5", 1e-3, 0.01),  # width 1.6: MindCV's eps=0.001, momentum=0.99
    ("efficientnet_b7", 1e-3, 0.01),
    ("efficientnet_v2_l", 1e-5, 0.1),
])
def test_batchnorm_settings_follow_width(name, bn_eps, bn_momentum):
    with torch.device("meta"):
        model = fz.create_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == bn_eps and m.momentum == bn_momentum for m in norms)


def test_block_layout_and_stochastic_depth():
    with torch.device("meta"):
        model = fz.create_model("efficientnet_v2_s", drop_path_prob=0.5)
    blocks = [m for m in model.modules() if isinstance(m, (MBConv, FusedMBConv))]
    assert [type(b).__name__ for b in blocks[:10]] == ["FusedMBConv"] * 10 and isinstance(blocks[-1], MBConv)
    rates = [1.0 - b.dropout.keep_prob for b in blocks]
    assert rates[0] == 0.0 and all(a < b for a, b in zip(rates, rates[1:])) and rates[-1] < 0.5
    # Squeeze-excite width: a quarter of the block's input (not expanded) channels; fused blocks have none.
    se = blocks[-1].block[6]
    assert se.conv_reduce.out_channels == 256 // 4 and se.conv_reduce.in_channels == 256 * 6
    assert not any(hasattr(m, "conv_reduce") for b in blocks if isinstance(b, FusedMBConv) for m in b.modules())


def test_stochastic_depth_is_identity_in_eval_only():
    model = fz.create_model("efficientnet_b0", drop_path_prob=0.9)
    block = model.features[8][3]  # a residual block deep in the net: drop rate 0.9 * 14 / 16
    assert block.shortcut and block.dropout.keep_prob < 0.5
    x = torch.randn(32, block.out_channels, 4, 4)
    with torch.no_grad():
        block.eval()
        torch.testing.assert_close(block(x), block.block(x) + x)
        block.train()
        branch = block(x) - x
    # In training whole samples lose the residual branch (output == input exactly); the others keep it.
    dropped = branch.flatten(1).abs().amax(1) == 0
    assert dropped.any() and not dropped.all()


@pytest.mark.parametrize("size", [64, 67])
def test_stride2_depthwise_uses_mindspore_same_padding(size):
    """MindSpore pads the odd pixel at the bottom/right; PyTorch's symmetric padding would shift the grid."""
    model = fz.create_model("efficientnet_b0").eval()
    conv = model.features[5][0].block[3]  # 5x5 stride-2 depthwise
    assert conv.kernel_size == (5, 5) and conv.stride == (2, 2) and conv.groups == conv.in_channels
    x = torch.randn(1, conv.in_channels, size, size)
    total = max((math.ceil(size / 2) - 1) * 2 + 5 - size, 0)
    before, after = total // 2, total - total // 2
    expected = nn.functional.conv2d(nn.functional.pad(x, (before, after, before, after)), conv.weight,
                                    stride=2, groups=conv.groups)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)
