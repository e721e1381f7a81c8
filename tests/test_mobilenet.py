"""MobileNetV2/V3 family checks: the pyramid agrees with timm's feature_info,
and ``out_indices="pyramid"`` selects one map per distinct reduction."""
import math

import pytest
import timm
import torch

import featurezoo as fz

# (ours, timm's same-architecture model). MindCV and timm round channels with the
# same make_divisible rule, so the width variants must agree too.
V3_PAIRS = [
    ("mobilenet_v3_large_100", "mobilenetv3_large_100"),
    ("mobilenet_v3_large_075", "mobilenetv3_large_075"),
    ("mobilenet_v3_small_100", "mobilenetv3_small_100"),
    ("mobilenet_v3_small_075", "mobilenetv3_small_075"),
]
V2_PAIRS = [
    ("mobilenet_v2_100", "mobilenetv2_100"),
    ("mobilenet_v2_140", "mobilenetv2_140"),
    ("mobilenet_v2_075", "mobilenetv2_075"),
    ("mobilenet_v2_050_224", "mobilenetv2_050"),
    ("mobilenet_v2_035_224", "mobilenetv2_035"),
]


def _timm_info(name):
    with torch.device("meta"):
        return timm.create_model(name, features_only=True, pretrained=False).feature_info


# timm records a level at the last block before each stride-2 block (and at the
# end), i.e. the last map at each reduction: the same rule as our "pyramid".
# Where a stride-2 block comes first (small's first bottleneck), timm's level-0
# is the stem's bn1+act, ours the stem's activation (features.2): the same map.


@pytest.mark.parametrize("ours, theirs", V3_PAIRS)
def test_v3_pyramid_matches_timm(ours, theirs):
    pyramid = fz.get_feature_info(ours, out_indices="pyramid")
    ref = _timm_info(theirs)
    assert pyramid.reduction() == ref.reduction()
    # timm's last level is its 1x1 conv to 6x the last block's width, which is
    # also MindCV's last entry: the pyramids agree level by level.
    assert pyramid.channels() == ref.channels()


@pytest.mark.parametrize("ours, theirs", V2_PAIRS)
def test_v2_pyramid_matches_timm_but_for_the_head_conv(ours, theirs):
    full = fz.get_feature_info(ours)
    pyramid = fz.get_feature_info(ours, out_indices="pyramid")
    ref = _timm_info(theirs)
    assert pyramid.reduction() == ref.reduction()
    assert pyramid.channels()[:-1] == ref.channels()[:-1]
    # Deliberate difference at stride 32: MindCV registers the final 1x1 conv
    # (1280 channels, 1792 for alpha 1.4) as its last entry, at the same
    # reduction as the last block, so "pyramid" picks it; timm stops at the last
    # block (320 * alpha channels) and keeps that conv as its conv_head. The
    # block is still selectable as out_indices=[-2].
    assert pyramid.module_name(-1) == full.module_name(-1)
    assert pyramid.channels(-1) >= 1280 > ref.channels(-1)
    assert (full.channels(-2), full.reduction(-2)) == (ref.channels(-1), ref.reduction(-1))


def test_v3_large_pyramid_is_one_map_per_distinct_reduction():
    size = 64
    full = fz.create_model("mobilenet_v3_large_100", features_only=True).eval()
    pyramid = fz.create_model("mobilenet_v3_large_100", features_only=True, out_indices="pyramid").eval()
    # The deepest pyramid level is the last entry, so both keep the same modules.
    pyramid.load_state_dict(full.state_dict())

    reductions = full.feature_info.reduction()
    distinct = sorted(set(reductions))
    assert pyramid.feature_info.reduction() == distinct == [2, 4, 8, 16, 32]
    # The last entry at each reduction: the block before each stride-2 block, then the head conv.
    assert pyramid.out_indices == [max(i for i, r in enumerate(reductions) if r == d) for d in distinct]
    assert pyramid.feature_info.module_name() == ["features.3", "features.5", "features.8", "features.14",
                                                  "features.20"]
    assert pyramid.out_channels == [16, 24, 40, 112, 960]

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        every, outs = full(x), pyramid(x)
    assert len(outs) == len(distinct)
    for out, idx, r, chs in zip(outs, pyramid.out_indices, distinct, pyramid.out_channels):
        assert tuple(out.shape) == (2, chs, math.ceil(size / r), math.ceil(size / r))
        torch.testing.assert_close(out, every[idx], rtol=0, atol=0)
