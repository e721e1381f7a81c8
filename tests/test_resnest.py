"""ResNeSt family checks beyond the generic contract and MindCV parity tests."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import SplitAttn as TimmSplitAttn

import featurezoo as fz
from featurezoo.models.resnest import SplitAttn


def test_pyramid_agrees_with_timm():
    with torch.device("meta"):
        ours = fz.create_model("resnest50", features_only=True, out_indices="pyramid").feature_info
    theirs = timm.create_model("resnest50d", features_only=True, pretrained=False).feature_info
    assert ours.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    assert ours.channels() == theirs.channels() == [64, 256, 512, 1024, 2048]


@pytest.mark.parametrize("kwargs, reductions", [
    ({}, [2, 4, 8, 16, 32]),
    (dict(dilation=2), [2, 4, 8, 16, 16]),
    (dict(dilation=4), [2, 4, 8, 8, 8]),
    (dict(dilated=True), [2, 4, 8, 8, 8]),
])
def test_dilated_feature_info_and_output_sizes(kwargs, reductions):
    model = fz.create_model("resnest14", features_only=True, **kwargs).eval()
    assert model.feature_info.reduction() == reductions
    assert model.feature_info.channels() == [64, 256, 512, 1024, 2048]
    for size in (64, 67):
        with torch.no_grad():
            outs = model(torch.randn(1, 3, size, size))
        assert [tuple(o.shape[-2:]) for o in outs] == [(math.ceil(size / r),) * 2 for r in reductions]


@pytest.mark.parametrize("kwargs", [dict(dilation=2), dict(dilated=True)])
def test_dilated_model_takes_the_classifier_weights(kwargs):
    with torch.device("meta"):
        plain = fz.create_model("resnest26").state_dict()
        dilated = fz.create_model("resnest26", **kwargs)
    assert {k: v.shape for k, v in dilated.state_dict().items()} == {k: v.shape for k, v in plain.items()}
    # MindCV's schedule: a dilated stage's first block keeps half the dilation of the blocks after it.
    last = 4 if kwargs.get("dilated") else 2
    assert [b.conv2.conv.dilation[0] for b in dilated.layer4] == [last // 2, last]


def test_unsupported_dilation_is_refused():
    with pytest.raises(ValueError, match="dilation=3"):
        fz.create_model("resnest14", dilation=3)


@pytest.mark.parametrize("radix, group", [(2, 1), (2, 2), (4, 2), (1, 4)])
def test_split_attention_matches_timm(radix, group):
    # MindCV's registered models all use radix 2, cardinality 1; timm's SplitAttn is the second opinion on
    # how the radix softmax orders channels when there are several cardinal groups (radix 1: a sigmoid).
    ours = SplitAttn(32, 32, kernel_size=3, padding=1, group=group, radix=radix, norm_layer=torch.nn.BatchNorm2d)
    theirs = TimmSplitAttn(32, 32, kernel_size=3, padding=1, groups=group, radix=radix,
                           norm_layer=torch.nn.BatchNorm2d)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in theirs.state_dict().items()}
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_shortcut_pool_rounds_up_like_the_main_path():
    # MindCV's shortcut pool is "valid" (floor) while its avd pool is "same" (ceil): MindCV cannot run a
    # stride-2 stage on an odd size. Ours rounds up, excluding the padded cells, as the original ResNeSt.
    model = fz.create_model("resnest14").eval()
    pool = model.layer2[0].downsample[0]
    x = torch.randn(1, 4, 17, 17)
    expected = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    torch.testing.assert_close(pool(x), expected)
    even = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(pool(even), F.avg_pool2d(even, 2, 2))  # MindCV's "valid" where it runs
