"""ReXNet family checks beyond the generic contract and MindCV parity tests."""
import pytest
import timm
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.layers.drop_path import DropPath
from featurezoo.models.rexnet import LinearBottleneck

# rexnet_10 / rexnet_100 is the pair asked for; the wider ones have timm twins too (rexnet_09 has none).
TIMM_TWINS = [("rexnet_10", "rexnet_100"), ("rexnet_13", "rexnet_130"), ("rexnet_15", "rexnet_150"),
              ("rexnet_20", "rexnet_200")]


@pytest.mark.parametrize("name, timm_name", TIMM_TWINS)
def test_pyramid_agrees_with_timm(name, timm_name):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid").feature_info
    theirs = timm.create_model(timm_name, features_only=True, pretrained=False).feature_info
    # No deliberate difference: timm picks the same blocks (the one before each downsampling block,
    # and the last block, not the 1x1 penultimate conv), under the same names.
    assert ours.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    assert ours.channels() == theirs.channels()
    assert ours.module_name() == theirs.module_name()


def test_partial_residual_adds_input_to_leading_channels():
    block = LinearBottleneck(16, 27, exp_ratio=6, stride=1).eval()
    assert block.use_shortcut
    with torch.no_grad():
        # Silence the projection's BN: the block's output is then exactly its shortcut, zero-padded.
        block.conv_pwl.features[1].weight.zero_()
        block.conv_pwl.features[1].bias.zero_()
        x = torch.randn(2, 16, 9, 9)
        out = block(x)
    assert out.shape == (2, 27, 9, 9)
    assert torch.equal(out[:, :16], x) and not out[:, 16:].any()
    assert not LinearBottleneck(16, 27, exp_ratio=6, stride=2).use_shortcut
    assert not LinearBottleneck(27, 16, exp_ratio=6, stride=1).use_shortcut


def test_training_step_backpropagates_through_residuals():
    model = fz.create_model("rexnet_09", num_classes=10).train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_block_layout_and_stochastic_depth():
    with torch.device("meta"):
        model = fz.create_model("rexnet_10", drop_path_rate=0.3)
    blocks = [m for m in model.features if isinstance(m, LinearBottleneck)]
    assert len(blocks) == 16 and model.depth == 48
    # Stage 1 is one block without expansion; SE from stage 3 on, with a BN between its convs.
    assert blocks[0].conv_exp is None and blocks[1].conv_exp is not None
    assert [b.se is not None for b in blocks] == [False] * 3 + [True] * 13
    assert isinstance(blocks[3].se.bn, nn.BatchNorm2d)
    assert blocks[5].se.conv_reduce.out_channels == int(blocks[5].se.conv_reduce.in_channels * (1 / 12))
    # Stochastic depth grows linearly from 0 (no DropPath) to the rate at the last block.
    assert blocks[0].drop_path is None
    assert all(isinstance(b.drop_path, DropPath) for b in blocks[1:])
    assert abs((1 - blocks[-1].drop_path.keep_prob) - 0.3) < 1e-9
    # The features Sequential ends with the 1x1 penultimate conv (1280 x width) and pooling.
    assert model.features[-2].features[0].out_channels == 1280 and model.num_features == 1280


def test_feature_model_drops_penultimate_conv_and_head():
    model = fz.create_model("rexnet_10", features_only=True)
    kept = {k.split(".")[0] + "." + k.split(".")[1] for k in model.state_dict() if k.startswith("features.")}
    assert "features.15" in kept and "features.16" not in kept
    assert not any(k.startswith("cls.") for k in model.state_dict())
