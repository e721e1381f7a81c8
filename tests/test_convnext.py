"""ConvNeXt family checks beyond the generic contract and MindCV parity tests."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.layers.drop_path import DropPath
from featurezoo.models.convnext import GRN, ConvNeXt, ConvNextLayerNorm


def _small(**kwargs) -> ConvNeXt:
    return ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10, **kwargs)


@pytest.mark.parametrize("name", ["convnext_tiny", "convnextv2_atto"])
def test_pyramid_agrees_with_timm(name):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid").feature_info
    theirs = timm.create_model(name, features_only=True, pretrained=False).feature_info
    # Same four stages: MindCV names them feature.1/3/5/7 (downsampling layers sit between), timm stages.0-3.
    assert ours.reduction() == theirs.reduction() == [4, 8, 16, 32]
    assert ours.channels() == theirs.channels()
    assert ours.module_name() == ["feature.1", "feature.3", "feature.5", "feature.7"]


@pytest.mark.parametrize("name, v2", [("convnext_small", False), ("convnextv2_femto", True)])
def test_norms_activation_and_layer_scale(name, v2):
    with torch.device("meta"):
        model = fz.create_model(name)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, ConvNextLayerNorm)]
    assert norms and all(m.eps == 1e-6 for _, m in norms)  # MindCV sets 1e-6; MindSpore's default is 1e-7
    # Stem and downsampling layers normalise NCHW input; blocks and the final norm are channels-last.
    first = {n for n, m in norms if m.norm_axis == 1}
    assert first == {"feature.0.1", "feature.2.0", "feature.4.0", "feature.6.0"}
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and all(m.approximate == "tanh" for m in gelus)
    keys = list(model.state_dict())
    assert any(k.endswith(".grn.gamma") for k in keys) == v2
    assert any(k.endswith(".gamma_") for k in keys) != v2


def test_layer_scale_initial_value():
    block = _small().feature[1][0]
    assert block.gamma_.shape == (8,) and torch.all(block.gamma_ == 1e-6)
    assert _small(layer_scale_init_value=0.0).feature[1][0].gamma_ is None


def test_grn_matches_paper_formula():
    grn = GRN(6)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 5, 4, 6)  # N, H, W, C
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), grn.gamma * (x * nx) + grn.beta + x)


def test_mindspore_names_load_without_touching_layer_scale_or_grn():
    """LayerNorm gamma/beta become weight/bias; the block's `gamma_` and GRN's `gamma`/`beta` keep their names."""
    src = _small(use_grn=True)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    layer_norms = {n for n, m in src.named_modules() if isinstance(m, nn.LayerNorm)}
    ms_state = {}
    for key, value in src.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layer_norms:
            leaf = {"weight": "gamma", "bias": "beta"}[leaf]
        ms_state[f"{owner}.{leaf}"] = value
    assert "feature.1.0.gamma_" in ms_state and "feature.1.0.grn.gamma" in ms_state and "norm.gamma" in ms_state

    dst = _small(use_grn=True)
    report = fz.load_checkpoint(dst, ms_state)
    assert not report.missing and not report.unexpected
    for key, value in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("size", [64, 67])
def test_stem_uses_mindspore_same_padding(size):
    """At sizes that are no multiple of 4 MindSpore pads the stem conv at the bottom/right only."""
    stem_conv = _small().feature[0][0]
    x = torch.randn(1, 3, size, size)
    extra = -size % 4
    expected = F.conv2d(F.pad(x, (0, extra, 0, extra)), stem_conv.weight, stem_conv.bias, stride=4)
    torch.testing.assert_close(stem_conv(x), expected)


def test_stochastic_depth_rates_and_eval_identity():
    # Layer scale 1 so that the residual branches visibly matter.
    model = _small(drop_path_rate=0.2, layer_scale_init_value=1.0).eval()
    blocks = [b for stage in list(model.feature)[1::2] for b in stage]
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 for the first block, as MindCV
    rates = [1.0 - b.drop_path.keep_prob for b in blocks[1:]]
    assert all(isinstance(b.drop_path, DropPath) for b in blocks[1:])
    torch.testing.assert_close(torch.tensor(rates), torch.tensor([0.05, 0.1, 0.15, 0.2]))

    plain = _small(layer_scale_init_value=1.0).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
        model.train()
        assert not torch.allclose(model(x), plain(x))
