"""PoolFormer checks beyond the generic contract and MindCV parity tests."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.models.poolformer import Pooling

LEVELS = ["network.0", "network.2", "network.4", "network.6"]


def _randomised(model):
    """Norm affines and layer scales of order one, so that every branch shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _stem_rows(size: int) -> int:
    return (size + 2 * 2 - 7) // 4 + 1  # k7 s4, 2 pixels of padding per side


def _expected_shapes(chs, h, w):
    h, w = _stem_rows(h), _stem_rows(w)
    shapes = []
    for i, c in enumerate(chs):
        if i:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # k3 s2 p1
        shapes.append((1, c, h, w))
    return shapes


@pytest.mark.parametrize("name, chs", [("poolformer_s12", [64, 128, 320, 512]),
                                       ("poolformer_m48", [96, 192, 384, 768])])
def test_pyramid_agrees_with_timm(name, chs):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid")
        theirs = timm.create_model(name, features_only=True).feature_info
    assert ours.out_indices == [0, 1, 2, 3]
    assert ours.feature_info.channels() == theirs.channels() == chs
    assert ours.feature_info.reduction() == theirs.reduction() == [4, 8, 16, 32]
    assert ours.feature_info.module_name() == LEVELS


def test_features_are_the_classifier_activations_at_the_native_size():
    full = _randomised(fz.create_model("poolformer_s12"))
    feat = fz.create_model("poolformer_s12", features_only=True).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    seen = {}
    hooks = [full.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in LEVELS]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        full(x)
        outs = feat(x)
    for h in hooks:
        h.remove()
    for name, out in zip(LEVELS, outs):
        assert torch.equal(out, seen[name]), name
        assert out.is_contiguous()


@pytest.mark.parametrize("size", [(65, 65), (97, 130)])
def test_any_size(size):
    """65 px: the stem's map is floor((65 + 1) / 4) = 16, not ceil(65 / 4) = 17 (why cfg.valid_padding)."""
    model = fz.create_model("poolformer_s12", features_only=True).eval()
    with torch.no_grad():
        shapes = [tuple(o.shape) for o in model(torch.randn(1, 3, *size))]
    assert shapes == _expected_shapes([64, 128, 320, 512], *size)
    assert fz.get_model_cfg("poolformer_s12").valid_padding


def test_detector_size_on_meta():
    with torch.device("meta"):
        model = fz.create_model("poolformer_m36", features_only=True)
        shapes = [tuple(o.shape) for o in model(torch.randn(1, 3, 800, 1333))]
    assert shapes == _expected_shapes([96, 192, 384, 768], 800, 1333)
    assert shapes[-1] == (1, 768, 25, 42)


def test_level_zero_computes_and_holds_nothing_beyond():
    feat = fz.create_model("poolformer_s12", features_only=True, out_indices=[0])
    names = {n for n, _ in feat.named_modules()}
    assert {n.split(".")[0] for n in names if n} == {"patch_embed", "network"}
    assert {n.split(".")[1] for n in names if n.startswith("network.")} == {"0"}
    full = fz.create_model("poolformer_s12").eval()
    fired = []
    full.network[1].register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        (out,) = full.forward_levels(torch.randn(1, 3, 64, 64), [0])
    assert out.shape == (1, 64, 16, 16) and not fired
    with torch.no_grad():
        full(torch.randn(1, 3, 64, 64))
    assert fired  # the hook does fire when the stage runs


def test_pooling_leaves_padding_out_of_the_average():
    # On a constant map the mixer is avg - x = 0 everywhere only if border windows average their real cells.
    x = torch.full((1, 2, 5, 6), 3.0)
    assert torch.equal(Pooling(3)(x), torch.zeros_like(x))
    counting_pad = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True) - x
    assert counting_pad.abs().max() > 1


def test_timm_weights_give_timm_features_and_logits_with_the_head_norm_swapped():
    """The same network as timm's poolformer_s12, bit for bit, at any size. The one difference is the
    head: MindCV normalises the stride-32 map (GroupNorm, eps 1e-5) and then pools; timm pools and then
    normalises (LayerNorm2d). Applying MindCV's order to timm's features and norm weights gives our logits."""
    theirs = _randomised(timm.create_model("poolformer_s12"))
    ours = fz.create_model("poolformer_s12").eval()
    report = fz.load_checkpoint(ours, theirs.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 67, 83)
    with torch.no_grad():
        for a, b in zip(ours.forward_levels(x, [0, 1, 2, 3]), theirs.forward_intermediates(x, intermediates_only=True)):
            assert torch.equal(a, b)
        logits = ours(x)
        fmap = theirs.forward_features(x)
        norm = theirs.head.norm
        swapped = theirs.head.fc(F.group_norm(fmap, 1, norm.weight, norm.bias, eps=1e-5).mean((2, 3)))
        timm_logits = theirs(x)
    torch.testing.assert_close(logits, swapped, rtol=1e-5, atol=1e-5)
    assert (logits - timm_logits).abs().max() > 1e-2 * timm_logits.abs().max()  # the difference is real


def test_mindspore_names_load_and_layer_scales_keep_theirs():
    src = _randomised(fz.create_model("poolformer_s12"))
    norms = {n for n, m in src.named_modules() if isinstance(m, nn.GroupNorm)}
    ms_state = {}
    for key, value in src.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in norms:
            leaf = {"weight": "gamma", "bias": "beta"}[leaf]
        ms_state[f"{owner}.{leaf}"] = value
    assert "network.0.0.norm1.gamma" in ms_state and "network.0.0.layer_scale_1" in ms_state
    dst = fz.create_model("poolformer_s12")
    report = fz.load_checkpoint(dst, ms_state)
    assert not report.missing and not report.unexpected
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
