"""Visformer checks beyond the generic contract and MindCV parity tests.

Visformer's features are the stem and the end of each stage, served by
``forward_levels`` (the classifier's own stage loop): these tests check the
pyramid, that the features are the classifier's own activations, other input
sizes (resampled position embeddings), pruning, the size limit, the v1/v2
attention scaling, and agreement with timm's ``visformer_tiny``.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.layers.tokens import nchw_to_tokens, resample_pos_embed, resample_pos_map, tokens_to_nchw


def _randomise_bn(model):
    """Non-trivial BatchNorm statistics, so that eval-mode outputs depend on every buffer."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _randomise_bn(fz.create_model("visformer_tiny"))


@pytest.fixture(scope="module")
def tiny_v2():
    torch.manual_seed(0)
    return _randomise_bn(fz.create_model("visformer_tiny_v2"))


def _features_of(full, name, **kwargs):
    feat = fz.create_model(name, features_only=True, **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


@pytest.mark.parametrize("name, chs, reductions", [
    ("visformer_tiny", [16, 96, 192, 384], [2, 8, 16, 32]),  # v1: no stride-4 level
    ("visformer_small", [32, 192, 384, 768], [2, 8, 16, 32]),
    ("visformer_tiny_v2", [24, 48, 96, 192, 384], [2, 4, 8, 16, 32]),
    ("visformer_small_v2", [32, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
])
def test_pyramid(name, chs, reductions):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid")
    assert ours.out_indices == list(range(len(chs)))
    assert ours.feature_info.channels() == chs
    assert ours.feature_info.reduction() == reductions
    if name in ("visformer_tiny", "visformer_small"):
        # timm lists the three stages; we add the stride-2 stem in front.
        theirs = timm.create_model(name, features_only=True).feature_info
        assert ours.feature_info.channels()[1:] == theirs.channels()
        assert ours.feature_info.reduction()[1:] == theirs.reduction()
        assert ours.feature_info.module_name() == ["stem"] + theirs.module_name()


@pytest.mark.parametrize("model", ["tiny", "tiny_v2"])
def test_features_are_the_classifiers_own_activations(model, request):
    """At 224 px the feature model's maps are bit-identical to the maps the classifier computes."""
    full = request.getfixturevalue(model)
    name = f"visformer_{model}"
    seen = {}
    modules = [full.stem] + [getattr(full, f"stage{k}")[-1] for k in full.stage_ids]
    hooks = [m.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, m in enumerate(modules)]
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            full(x)
            feats = _features_of(full, name)(x)
    finally:
        for h in hooks:
            h.remove()
    assert [tuple(f.shape[1:]) for f in feats] == [(e["chs"], 224 // e["reduction"], 224 // e["reduction"])
                                                   for e in full.feature_info]
    assert len(seen) == len(feats)
    for i, f in enumerate(feats):
        assert f.is_contiguous()
        assert torch.equal(f, seen[i]), f"level {i}"


@pytest.mark.parametrize("hw", [(160, 160), (97, 130)])
def test_other_sizes_resample_the_position_embeddings(tiny_v2, hw):
    h, w = hw
    stem = (-(-h // 2), -(-w // 2))  # 7x7 s2 conv, padding 3: rounds up
    expected, side = [(1, 24) + stem], stem
    for chs in (48, 96, 192, 384):  # unpadded k2 s2 patch convs: round down
        side = (side[0] // 2, side[1] // 2)
        expected.append((1, chs) + side)
    feat = _features_of(tiny_v2, "visformer_tiny_v2")
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        assert [tuple(o.shape) for o in feat(x)] == expected
        assert tiny_v2(x).shape == (1, 1000)  # the classifier runs there too
        grid = expected[1][2:]
        pe = resample_pos_map(tiny_v2.pos_embed0, torch.empty(1, 1, *grid))
    want = tokens_to_nchw(resample_pos_embed(nchw_to_tokens(tiny_v2.pos_embed0), grid, (56, 56)), grid)
    assert torch.equal(pe, want)
    assert resample_pos_map(tiny_v2.pos_embed0, torch.empty(1, 1, 56, 56)) is tiny_v2.pos_embed0  # native size: untouched


def test_first_level_only_holds_and_computes_nothing_later(tiny):
    feat = fz.create_model("visformer_tiny", features_only=True, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("stem.") for k in keys)
    assert not any(k.startswith(("patch_embed", "pos_embed", "stage", "norm.", "head.")) for k in keys)
    fired = []
    hook = tiny.patch_embed1.register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(tiny.forward_levels(x, [0])) == 1
            assert not fired
            tiny.forward_levels(x, [1])
            assert fired
    finally:
        hook.remove()


def test_inputs_too_small_for_the_patch_convs_are_refused():
    full = fz.create_model("visformer_tiny").eval()
    stem_only = fz.create_model("visformer_tiny", features_only=True, out_indices=[0]).eval()
    with torch.no_grad():
        assert full(torch.randn(1, 3, 31, 31)).shape == (1, 1000)  # stage 3 is 1x1
        with pytest.raises(ValueError, match="input 30x64 px is too small; the smallest it takes is 31x31 px"):
            full(torch.randn(1, 3, 30, 64))
        assert stem_only(torch.randn(1, 3, 20, 20))[0].shape == (1, 16, 10, 10)  # the stem alone needs nothing


@pytest.mark.parametrize("name, exponent", [("visformer_tiny", -0.25), ("visformer_tiny_v2", -0.5)])
def test_attention_scales_q_and_k(name, exponent):
    """MindCV multiplies q and k each by head_dim ** exponent before q @ k^T."""
    torch.manual_seed(0)
    attn = fz.create_model(name).stage2[0].attn.eval()
    x = torch.randn(2, attn.qkv.in_channels, 5, 6)
    b, n, d = 2, 30, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, 3, attn.num_heads, d, n).permute(1, 0, 2, 4, 3)
    s = d ** exponent
    out = F.softmax((q * s) @ (k * s).transpose(-1, -2), dim=-1) @ v
    expected = attn.proj(out.transpose(2, 3).reshape(b, -1, 5, 6))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected.detach(), rtol=1e-5, atol=1e-5)


def _calibrate_bn(model, x):
    """BatchNorm statistics of one batch, with random affine parameters: activations stay near unit
    scale (with random statistics they reach ~1e4 and attention amplifies float32 rounding)."""
    _randomise_bn(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def test_timm_weights_give_timm_outputs():
    """timm's visformer_tiny has our names and shapes. The one computational difference is MindCV's tanh
    GELU (timm: exact): swapped back, logits and features agree."""
    torch.manual_seed(0)
    theirs = _calibrate_bn(timm.create_model("visformer_tiny"), torch.randn(8, 3, 224, 224))
    ours = fz.create_model("visformer_tiny")
    report = fz.load_checkpoint(ours, theirs.state_dict())
    assert not report.missing and not report.unexpected
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(theirs.state_dict())
    assert all(torch.equal(ours_sd[k], t) for k, t in theirs.state_dict().items())
    ours.eval()
    feat = _features_of(ours, "visformer_tiny", out_indices=[1, 2, 3])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours_tanh = ours(x)
        for module in list(ours.modules()) + list(feat.modules()):
            for child_name, child in module.named_children():
                if isinstance(child, torch.nn.GELU):
                    setattr(module, child_name, torch.nn.GELU())
        logits, theirs_logits = ours(x), theirs(x)
        feats, theirs_feats = feat(x), theirs.forward_intermediates(x, intermediates_only=True)
    scale = theirs_logits.abs().max()
    assert (logits - theirs_logits).abs().max() <= 1e-5 * scale
    assert (ours_tanh - theirs_logits).abs().max() > 1e-4 * scale  # the difference is real
    for a, b in zip(feats, theirs_feats):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
