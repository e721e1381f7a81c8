"""PiT checks beyond the generic contract and MindCV parity tests.

PiT's features are the spatial tokens after each transformer stage, as NCHW
maps, served by ``forward_levels`` (the classifier's own stage loop): these
tests check the pyramid, that the features are the classifier's own
activations, other input sizes (resampled position embedding), pruning,
MindSpore's saved names, and agreement with timm's ``pit_*_224``.
"""
import pytest
import timm
import torch

import featurezoo as fz
from featurezoo.layers.tokens import nchw_to_tokens, resample_pos_embed, resample_pos_map, tokens_to_nchw


def _randomise_ln(model):
    """LayerNorms that are not the identity, so that outputs depend on every norm parameter."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pit_ti():
    torch.manual_seed(0)
    return _randomise_ln(fz.create_model("pit_ti"))


def _features_of(full, **kwargs):
    feat = fz.create_model("pit_ti", features_only=True, **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


@pytest.mark.parametrize("name, chs, reductions", [
    ("pit_ti", [64, 128, 256], [8, 16, 32]),
    ("pit_xs", [96, 192, 384], [8, 16, 32]),
    ("pit_s", [144, 288, 576], [8, 16, 32]),
    ("pit_b", [256, 512, 1024], [7, 14, 28]),  # PiT-B patches with k14 s7
])
def test_pyramid_is_the_three_stages_as_in_timm(name, chs, reductions):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid")
        theirs = timm.create_model(f"{name}_224", features_only=True).feature_info
    assert ours.out_indices == [0, 1, 2]  # no stride-4 level
    assert ours.feature_info.channels() == theirs.channels() == chs
    assert ours.feature_info.reduction() == theirs.reduction() == reductions
    assert ours.feature_info.module_name() == theirs.module_name() == [f"transformers.{i}" for i in range(3)]


def test_features_are_the_classifiers_own_activations(pit_ti):
    """At 224 px the feature model's maps are bit-identical to the maps the classifier computes."""
    seen = {}
    hooks = [pit_ti.transformers[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0]))
             for i in range(3)]
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            pit_ti(x)
            feats = _features_of(pit_ti)(x)
    finally:
        for h in hooks:
            h.remove()
    assert [tuple(f.shape) for f in feats] == [(1, 64, 27, 27), (1, 128, 14, 14), (1, 256, 7, 7)]
    for i, f in enumerate(feats):
        assert f.is_contiguous()
        assert torch.equal(f, seen[i]), f"level {i}"


@pytest.mark.parametrize("hw", [(160, 160), (97, 130)])
def test_other_sizes_resample_the_position_embedding(pit_ti, hw):
    h, w = hw
    grid = ((h - 16) // 8 + 1, (w - 16) // 8 + 1)  # unpadded k16 s8 patch conv
    shapes = [(1, c, -(-grid[0] // s), -(-grid[1] // s)) for c, s in ((64, 1), (128, 2), (256, 4))]
    feat = _features_of(pit_ti)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        outs = feat(x)
        assert [tuple(o.shape) for o in outs] == shapes
        assert pit_ti(x).shape == (1, 1000)  # the classifier runs there too
        # The embedding added at this size is timm's bicubic resampling of the 27x27 one.
        pe = resample_pos_map(pit_ti.pos_embed, torch.empty(1, 1, *grid))
    expected = tokens_to_nchw(resample_pos_embed(nchw_to_tokens(pit_ti.pos_embed), grid, (27, 27)), grid)
    assert pe.shape == (1, 64) + grid and torch.equal(pe, expected)
    assert resample_pos_map(pit_ti.pos_embed, torch.empty(1, 1, 27, 27)) is pit_ti.pos_embed  # native size: untouched


def test_first_level_only_holds_and_computes_nothing_later(pit_ti):
    feat = fz.create_model("pit_ti", features_only=True, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("transformers.0.") for k in keys)
    assert not any(k.startswith(("transformers.1.", "transformers.2.", "pools.", "norm.", "head.")) for k in keys)
    # On the full model, forward_levels([0]) never reaches the first pool; asking for level 1 does.
    fired = []
    hook = pit_ti.pools[0].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(pit_ti.forward_levels(x, [0])) == 1
            assert not fired
            pit_ti.forward_levels(x, [1])
            assert fired
    finally:
        hook.remove()


def test_inputs_smaller_than_the_patch_are_refused():
    feat = fz.create_model("pit_ti", features_only=True, out_indices=[0]).eval()
    with torch.no_grad():
        assert feat(torch.randn(1, 3, 16, 40))[0].shape == (1, 64, 1, 4)
        with pytest.raises(ValueError, match="smaller than the 16-px patch"):
            feat(torch.randn(1, 3, 15, 40))


def test_mindspore_saved_names_load(pit_ti):
    """MindSpore saves the appended CellLists' parameters without their prefix; both forms load."""
    def saved_name(key):
        stage, rest = key.split(".", 2)[1:] if key.startswith("transformers.") else (None, key)
        if stage is not None:
            return f"0.{rest}" if stage == "0" else f"0.blocks.{stage}.{rest}"
        return key[len("pools."):] if key.startswith("pools.") else key

    weights = pit_ti.state_dict()
    saved = {saved_name(k): v for k, v in weights.items()}
    assert "0.blocks.1.blocks.0.attn.q.weight" in saved and "0.blocks.1.norm1.weight" in saved
    assert "1.fc.bias" in saved
    for state in (saved, weights):
        other = fz.create_model("pit_ti")
        report = fz.load_checkpoint(other, state)
        assert not report.missing and not report.unexpected
        assert all(torch.equal(v, weights[k]) for k, v in other.state_dict().items())


def test_timm_weights_give_timm_outputs():
    """timm's pit_ti_224 has our parameters with q/k/v fused and each pool inside the next stage.
    The one computational difference is MindCV's tanh GELU (timm: exact): swapped back, logits and
    features agree."""
    torch.manual_seed(0)
    theirs = _randomise_ln(timm.create_model("pit_ti_224"))
    ours = fz.create_model("pit_ti")
    report = fz.load_checkpoint(ours, theirs.state_dict())
    assert not report.missing and not report.unexpected
    ours_sd = ours.state_dict()
    for name, t in theirs.state_dict().items():
        if ".attn.qkv." in name:  # fused q, k, v: each third lands under its own name
            for part, chunk in zip("qkv", t.chunk(3)):
                assert torch.equal(ours_sd[name.replace(".qkv.", f".{part}.")], chunk), name
        else:
            hits = [k for k, v in ours_sd.items() if v.shape == t.shape and torch.equal(v, t)]
            assert hits, name
    x = torch.randn(2, 3, 224, 224)
    feat = _features_of(ours.eval())
    with torch.no_grad():
        ours_tanh = ours(x)
        for module in list(ours.modules()) + list(feat.modules()):
            if hasattr(module, "act") and isinstance(module.act, torch.nn.GELU):
                module.act = torch.nn.GELU()
        logits, theirs_logits = ours(x), theirs(x)
        feats, theirs_feats = feat(x), theirs.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(logits, theirs_logits, rtol=1e-4, atol=1e-4)
    assert (ours_tanh - theirs_logits).abs().max() > 1e-4  # the difference is real
    for a, b in zip(feats, theirs_feats):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
