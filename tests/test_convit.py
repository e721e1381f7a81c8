"""ConViT checks beyond the generic contract and MindCV parity tests.

ConViT's features are the patch tokens after each block as NCHW maps at the
patch stride (the class token, which joins before block ``local_up_to_layer``,
dropped), plus the parameter-free pyramid levels derived from the last block,
served by ``forward_levels`` (the classifier's own block loop). These tests
check the levels, that the features are the classifier's own activations, the
relative indices GPSA uses (MindCV's at the native grid, rebuilt for others),
other input sizes, pruning, and agreement with timm's ``convit_*`` on the same
weights once MindCV's LayerNorm eps and tanh GELU are swapped back.
"""
import copy

import pytest
import timm
import torch
from timm.models.convit import GPSA as TimmGPSA
from timm.models.convit import ConVit as TimmConVit

import featurezoo as fz
from featurezoo.features import FeatureExtractWrapper
from featurezoo.layers.tokens import resample_pos_embed
from featurezoo.models.convit import ConViT, _from_timm, rel_indices

NAMES = {"convit_tiny": 192, "convit_tiny_plus": 256, "convit_small": 432, "convit_small_plus": 576,
         "convit_base": 768, "convit_base_plus": 1024}
# A small ConViT of the same class: 64 px, patch 16 (a 4x4 grid), 4 blocks, the first 2 GPSA.
TINY = dict(image_size=64, patch_size=16, embed_dim=48, num_heads=4, depth=4, local_up_to_layer=2, num_classes=10)


def _tiny():
    torch.manual_seed(0)
    return ConViT(**TINY)


@pytest.fixture(scope="module")
def tiny():
    """Weights of order one (so that GELU leaves its near-linear range), random LayerNorms and gates."""
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gating_param"):
                p.copy_(torch.randn(p.shape, generator=g) * 2)
            elif p.dim() == 2:
                p.normal_(0.0, 0.15, generator=g)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _features_of(full, **kwargs):
    feat = FeatureExtractWrapper(_tiny(), **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


# -- feature_info ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NAMES))
def test_feature_info_is_every_block_plus_the_derived_pyramid(name):
    info = fz.get_feature_info(name)
    native = [e for e in info if e["native"]]
    assert [e["name"] for e in native] == [f"blocks.{i}" for i in range(12)]
    assert {e["reduction"] for e in native} == {16} and {e["chs"] for e in info} == {NAMES[name]}
    with torch.device("meta"):
        feat = fz.create_model(name, features_only=True, out_indices="pyramid")  # keeps every block
    assert [type(b.attn).__name__ for b in feat.blocks] == ["GPSA"] * 10 + ["MHSA"] * 2
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    assert feat.feature_info.module_name() == ["blocks.11@4", "blocks.11@8", "blocks.11", "blocks.11@32"]


# -- relative indices ------------------------------------------------------------------------------------


def test_rel_indices_are_mindcvs_at_the_native_grid_and_follow_any_grid():
    # MindCV's get_rel_indices(196) (timm's is the same construction): bit-identical.
    theirs = TimmGPSA(48, 4).get_rel_indices(196)
    assert torch.equal(rel_indices((14, 14)), theirs)
    # A non-square grid, by the definition: (dx, dy, dx^2 + dy^2) between row-major patches.
    h, w = 3, 5
    rel = rel_indices((h, w))
    assert rel.shape == (1, 15, 15, 3)
    for p in range(h * w):
        for q in range(h * w):
            dx, dy = q % w - p % w, q // w - p // w
            assert rel[0, p, q].tolist() == [dx, dy, dx * dx + dy * dy]
    # The native indices are a buffer the checkpoint does not store (MindCV's does not either).
    with torch.device("meta"):
        model = fz.create_model("convit_tiny")
    assert model.rel_indices.shape == (1, 196, 196, 3) and "rel_indices" not in model.state_dict()


def test_other_grids_get_their_own_indices_and_resampled_embedding(tiny):
    seen = []
    hook = tiny.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    try:
        with torch.no_grad():
            tiny(torch.randn(1, 3, 64, 64))
            tiny(torch.randn(1, 3, 80, 144))
            tiny(torch.randn(1, 3, 80, 144))
    finally:
        hook.remove()
    assert seen[0] is tiny.rel_indices  # the native grid: the buffer itself
    assert torch.equal(seen[1], rel_indices((5, 9))) and seen[2] is seen[1]  # built once for 5x9, then kept
    assert tiny.rel_indices.shape == (1, 16, 16, 3)  # the buffer stays at the native grid
    assert resample_pos_embed(tiny.pos_embed, (4, 4), (4, 4)) is tiny.pos_embed


# -- features --------------------------------------------------------------------------------------------


def test_features_are_the_classifiers_own_activations(tiny):
    """At the native size every block's map is bit-identical to the patch tokens the classifier computes
    (blocks 2-3 run after the class token joined: it is dropped)."""
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
    assert [seen[i].shape[1] for i in range(4)] == [16, 16, 17, 17]
    native = [i for i, e in enumerate(feat.feature_info) if e["native"]]
    for block, i in enumerate(native):
        tokens = seen[block][:, 1:] if block >= 2 else seen[block]
        expected = tokens.transpose(1, 2).reshape(2, 48, 4, 4)
        assert outs[i].is_contiguous() and torch.equal(outs[i], expected), f"block {block}"


@pytest.mark.parametrize("hw", [(96, 96), (80, 144)])
def test_other_sizes(tiny, hw):
    grid = (hw[0] // 16, hw[1] // 16)
    feat = _features_of(tiny, out_indices="pyramid")
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        outs = feat(x)
        assert tiny(x).shape == (1, 10)  # the classifier runs there too
    assert [tuple(o.shape) for o in outs] == [(1, 48, grid[0] * 4, grid[1] * 4), (1, 48, grid[0] * 2, grid[1] * 2),
                                              (1, 48, *grid), (1, 48, -(-grid[0] // 2), -(-grid[1] // 2))]


def test_first_level_only_holds_and_computes_nothing_later(tiny):
    feat = _features_of(tiny, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("blocks.0.") for k in keys) and "pos_embed" in keys
    assert not any(k.startswith(("blocks.1.", "norm.", "classifier.")) for k in keys)
    assert "cls_token" not in keys  # it would join after block 1
    assert "cls_token" in _features_of(tiny, out_indices=[2]).state_dict()
    fired = []
    hook = tiny.blocks[1].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(tiny.forward_levels(x, [0])) == 1
            assert not fired
            tiny.forward_levels(x, [1])
            assert fired
    finally:
        hook.remove()
    with torch.no_grad():
        assert [tuple(o.shape) for o in feat(x)] == [(1, 48, 4, 4)]


def test_inputs_smaller_than_the_patch_are_refused(tiny):
    feat = _features_of(tiny, out_indices=[0, 5])  # blocks.0, blocks.3
    with torch.no_grad():
        assert [tuple(o.shape) for o in feat(torch.randn(1, 3, 16, 40))] == [(1, 48, 1, 2), (1, 48, 1, 2)]
        with pytest.raises(ValueError, match="smaller than the 16-px patch"):
            feat(torch.randn(1, 3, 15, 40))


# -- timm ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convit_tiny", "convit_small", "convit_base"])
def test_timm_twins_convert_to_our_names_and_shapes(name):
    """timm fuses GPSA's qk and MHSA's qkv; the declared conversion splits them (test_timm_weights checks
    every tensor lands bit-exact)."""
    with torch.device("meta"):
        ours = fz.create_model(name)
        theirs = timm.create_model(fz.get_model_cfg(name).timm_twin)
    assert fz.get_model_cfg(name).timm_twin == name
    converted = _from_timm(theirs.state_dict())
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def _as_timm_computes(model):
    """Our model with timm's LayerNorm eps (1e-6) and exact GELU: MindCV's two differences swapped back."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
        if isinstance(m, torch.nn.GELU):
            m.approximate = "none"
    return model


@pytest.mark.parametrize("side", [64, 96])
def test_timm_weights_give_timm_outputs(tiny, side):
    """timm's ConVit on the same weights (converted by the declared timm_convert) gives our logits and
    per-block features once LayerNorm eps 1e-7 and the tanh GELU are swapped for timm's. timm runs only at
    the size it is built for: at 96 px it is built there and given our resampled position embedding, so its
    own relative indices for the 6x6 grid check ours."""
    theirs = TimmConVit(img_size=side, patch_size=16, embed_dim=12, num_heads=4, depth=4, local_up_to_layer=2,
                        num_classes=10).eval()
    sd = {k: v for k, v in theirs.state_dict().items()}
    ours_sd = tiny.state_dict()
    # Our weights into timm's layout: the inverse of _from_timm, checked by round trip.
    for k in sd:
        if k in ("pos_embed",):
            continue
        pieces = _from_timm({k: sd[k]})
        sd[k] = torch.cat([ours_sd[n] for n in pieces]) if len(pieces) > 1 else ours_sd[next(iter(pieces))]
    grid = (side // 16, side // 16)
    sd["pos_embed"] = resample_pos_embed(tiny.pos_embed, grid, (4, 4)).detach()
    theirs.load_state_dict(sd)
    assert all(torch.equal(v, ours_sd[k]) for k, v in _from_timm(sd).items() if k != "pos_embed")
    swapped = _as_timm_computes(copy.deepcopy(tiny))
    native = [i for i, e in enumerate(tiny.feature_info) if e["native"]]
    feat = _as_timm_computes(_features_of(tiny, out_indices=native))
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        theirs_logits = theirs(x)
        torch.testing.assert_close(swapped(x), theirs_logits, rtol=1e-4, atol=1e-4)
        assert (tiny(x) - theirs_logits).abs().max() > 1e-4  # the differences are real
        ref = theirs.forward_intermediates(x, intermediates_only=True)
        outs = feat(x)
    assert len(outs) == len(ref) == 4
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
