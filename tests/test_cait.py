"""CaiT checks beyond the generic contract and MindCV parity tests.

CaiT's features are the patch tokens after each self-attention block as NCHW
maps at stride 16, plus the parameter-free pyramid levels derived from the
last block, served by ``forward_levels`` (the classifier's own block loop).
The class-attention blocks update only the class token: they are no levels
and a feature model drops them. These tests check the levels, that the
features are the classifier's own activations, other input sizes (resampled
position embedding without a class slot), pruning, and agreement with timm's
``Cait`` once its extra biases are zero and its GELU is MindSpore's.
"""
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.cait import Cait

import featurezoo as fz
from featurezoo.features import FeatureExtractWrapper
from featurezoo.layers.tokens import resample_pos_embed
from featurezoo.models.cait import CaiT

_TINY = dict(image_size=64, embed_dim=48, depth=4, num_heads=4, num_classes=10)


def _tiny_model():
    torch.manual_seed(0)
    return CaiT(init_values=0.5, **_TINY)


@pytest.fixture(scope="module")
def tiny():
    """A small CaiT of the same class (64 px: a 4x4 grid, 4 blocks), with weights of order one and
    layer scales of 0.5, so that every branch (GELU, talking heads, norms) shows in the outputs."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.15, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _features_of(full, **kwargs):
    feat = FeatureExtractWrapper(_tiny_model(), **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


# -- feature_info ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, depth, chs", [("cait_xxs24_224", 24, 192), ("cait_m48_448", 48, 768)])
def test_feature_info_is_every_self_attention_block_plus_the_derived_pyramid(name, depth, chs):
    info = fz.get_feature_info(name)
    native = [e for e in info if e["native"]]
    assert [e["name"] for e in native] == [f"blocks.{i}" for i in range(depth)]  # no blocks_token_only
    assert {e["reduction"] for e in native} == {16} and {e["chs"] for e in info} == {chs}
    assert info[0]["name"] == "blocks.0"
    with torch.device("meta"):
        feat = fz.create_model(name, features_only=True, out_indices="pyramid")
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    last = f"blocks.{depth - 1}"
    assert feat.feature_info.module_name() == [f"{last}@4", f"{last}@8", last, f"{last}@32"]
    # The class-attention blocks, the class token, the final norm and the head are gone.
    assert not any(k.startswith(("blocks_token_only.", "cls_token", "norm.", "head."))
                   for k in feat.state_dict())


def test_pyramid_levels_derive_from_the_last_block(tiny):
    feat = _features_of(tiny, out_indices="pyramid")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = feat(x)
        last = tiny.forward_levels(x, [[e["name"] for e in tiny.feature_info].index("blocks.3")])[0]
    assert [tuple(o.shape) for o in outs] == [(2, 48, 16, 16), (2, 48, 8, 8), (2, 48, 4, 4), (2, 48, 2, 2)]
    assert torch.equal(outs[2], last)
    torch.testing.assert_close(outs[0], F.interpolate(last, scale_factor=4, mode="bilinear"), rtol=0, atol=1e-6)
    assert torch.equal(outs[3], F.max_pool2d(last, 2))


def test_features_are_the_classifiers_own_activations(tiny):
    """At the native size every block's map is bit-identical to the tokens the classifier computes
    (CaiT's blocks hold no class token: all tokens are the grid)."""
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, blk in
             enumerate(tiny.blocks)]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            tiny(x)
            feat = _features_of(tiny)
            outs = feat(x)
    finally:
        for h in hooks:
            h.remove()
    native = [i for i, e in enumerate(feat.feature_info) if e["native"]]
    assert len(native) == 4
    for block, i in enumerate(native):
        expected = seen[block].transpose(1, 2).reshape(2, 48, 4, 4)
        assert outs[i].is_contiguous() and torch.equal(outs[i], expected), f"block {block}"


@pytest.mark.parametrize("hw", [(96, 96), (80, 144)])
def test_other_sizes_resample_the_position_embedding(tiny, hw):
    h, w = hw
    grid = (h // 16, w // 16)
    feat = _features_of(tiny, out_indices="pyramid")
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        outs = feat(x)
        assert tiny(x).shape == (1, 10)  # the classifier runs there too
        tokens, hw_seen = tiny._embed(x)
    assert hw_seen == grid and tokens.shape == (1, grid[0] * grid[1], 48)  # no class-token slot
    assert [tuple(o.shape[-2:]) for o in outs] == [(grid[0] * 4, grid[1] * 4), (grid[0] * 2, grid[1] * 2), grid,
                                                   (-(-grid[0] // 2), -(-grid[1] // 2))]
    pe = resample_pos_embed(tiny.pos_embed, grid, (4, 4))
    expected = tiny.patch_embed(x).flatten(2).transpose(1, 2) + pe
    assert torch.equal(tokens, expected)
    assert resample_pos_embed(tiny.pos_embed, (4, 4), (4, 4)) is tiny.pos_embed


def test_first_level_only_holds_and_computes_nothing_later(tiny):
    feat = _features_of(tiny, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("blocks.0.") for k in keys)
    assert not any(k.startswith(("blocks.1.", "blocks_token_only.", "cls_token", "norm.", "head.")) for k in keys)
    fired = []
    hooks = [tiny.blocks[1].register_forward_hook(lambda *a: fired.append("blocks.1")),
             tiny.blocks_token_only[0].register_forward_hook(lambda *a: fired.append("blocks_token_only.0"))]
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(tiny.forward_levels(x, [0])) == 1
            assert not fired
            tiny.forward_levels(x, [len(tiny.feature_info) - 1])  # a derived level needs the last block...
            assert fired == ["blocks.1"]  # ... but never the class-attention blocks
    finally:
        for h in hooks:
            h.remove()


def test_inputs_smaller_than_the_patch_are_refused(tiny):
    feat = _features_of(tiny, out_indices=[0, -1])
    with torch.no_grad():
        assert [tuple(o.shape) for o in feat(torch.randn(1, 3, 16, 40))] == [(1, 48, 1, 2), (1, 48, 1, 1)]
        with pytest.raises(ValueError, match="smaller than the 16-px patch"):
            feat(torch.randn(1, 3, 15, 40))


# -- timm ----------------------------------------------------------------------------------------------

# timm's CaiT has these biases; MindCV's (and ours) has none of them.
_TIMM_ONLY = (".attn.qkv.bias", ".attn.proj_l.bias", ".attn.proj_w.bias", ".attn.q.bias", ".attn.k.bias",
              ".attn.v.bias")


@pytest.mark.parametrize("name", ["cait_xxs24_224", "cait_m48_448"])
def test_timm_cait_has_our_parameters_plus_biases(name):
    """Not a twin: timm's registered cait_* hold every one of our tensors under the same name and
    shape, plus biases MindCV's CaiT lacks (qkv, proj_l, proj_w, class-attention q/k/v, and the
    self-attention proj)."""
    with torch.device("meta"):
        ours = {k: v.shape for k, v in fz.create_model(name).state_dict().items()}
        theirs = {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
    assert not fz.get_model_cfg(name).timm_twin
    extra = set(theirs) - set(ours)
    assert not set(ours) - set(theirs) and all(theirs[k] == v for k, v in ours.items())
    assert extra and all(k.endswith(_TIMM_ONLY) or (k.startswith("blocks.") and k.endswith(".attn.proj.bias"))
                         for k in extra)
    assert len(extra) == 4 * len([k for k in ours if k.endswith(".attn.qkv.weight")]) + 3 * 2


def test_timm_with_the_differences_swapped_computes_our_function(tiny):
    """timm's Cait without qkv biases, with its other extra biases (proj, proj_l, proj_w) zero and
    MindSpore's tanh GELU gives our logits and per-block features (timm runs only at its native size)."""
    theirs = Cait(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=4, num_classes=10, qkv_bias=False,
                  init_values=0.5, act_layer=partial(torch.nn.GELU, approximate="tanh")).eval()
    ours = tiny.state_dict()
    sd = theirs.state_dict()
    extra = set(sd) - set(ours)
    assert extra and all(k.endswith((".attn.proj.bias", ".attn.proj_l.bias", ".attn.proj_w.bias")) for k in extra)
    theirs.load_state_dict({**{k: torch.zeros_like(sd[k]) for k in extra}, **ours})
    x = torch.randn(2, 3, 64, 64)
    feat = _features_of(tiny, out_indices=[i for i, e in enumerate(tiny.feature_info) if e["native"]])
    with torch.no_grad():
        torch.testing.assert_close(tiny(x), theirs(x), rtol=1e-5, atol=1e-5)
        ref = theirs.forward_intermediates(x, intermediates_only=True)
        outs = feat(x)
        assert len(outs) == len(ref) == 4
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # The differences are real: timm's exact GELU moves the logits.
        for m in theirs.modules():
            if isinstance(m, torch.nn.GELU):
                m.approximate = "none"
        assert (tiny(x) - theirs(x)).abs().max() > 1e-4
