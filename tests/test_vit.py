"""ViT checks beyond the generic contract and MindCV parity tests.

ViT's features are the patch tokens after each block as NCHW maps at the patch
stride, plus the parameter-free pyramid levels derived from the last block
(``featurezoo.layers.plain_pyramid``), served by ``forward_levels`` (the
classifier's own block loop). These tests check the pyramid and its derived
levels, that the features are the classifier's own activations, other input
sizes (resampled position embedding), pruning, and agreement with timm's
``vit_*`` on the same weights.
"""
import copy
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.features import FeatureExtractWrapper
from featurezoo.layers.plain_pyramid import derive_level, derived_strides, level_blocks, plain_feature_info
from featurezoo.layers.tokens import resample_pos_embed
from featurezoo.models.vit import VisionTransformer


def _randomise_ln(model, seed=1):
    """LayerNorms that are not the identity, so that outputs depend on every norm parameter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """A small ViT of the same class (64 px, patch 16: a 4x4 grid, 4 blocks)."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=4, num_classes=10)
    with torch.no_grad():  # weights of order one, so that GELU's input leaves its near-linear range
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.15)
    return _randomise_ln(model)


def _features_of(full, **kwargs):
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=4, num_classes=10)
    feat = FeatureExtractWrapper(model, **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


# -- feature_info and the parameter-free pyramid -----------------------------------------------------


def test_plain_feature_info_order_gives_the_pyramid():
    assert derived_strides(16) == [4, 8, 32] and derived_strides(32) == [4, 8, 16] and derived_strides(14) == []
    info = plain_feature_info(8, 16, ["b.0", "b.1", "b.2"])
    assert [e["name"] for e in info] == ["b.0", "b.1", "b.2@4", "b.2@8", "b.2", "b.2@32"]
    assert level_blocks(info) == [0, 1, 2, 2, 2, 2]
    info = plain_feature_info(8, 14, ["b.0", "b.1"])
    assert [e["name"] for e in info] == ["b.0", "b.1"] and all(e["native"] for e in info)


@pytest.mark.parametrize("name, depth, patch, chs", [
    ("vit_b_16_224", 12, 16, 768), ("vit_b_32_384", 12, 32, 768), ("vit_l_16_384", 24, 16, 1024),
    ("vit_l_32_224", 24, 32, 1024),
])
def test_feature_info_is_every_block_plus_the_derived_pyramid(name, depth, patch, chs):
    info = fz.get_feature_info(name)
    native = [e for e in info if e["native"]]
    assert [e["name"] for e in native] == [f"blocks.{i}" for i in range(depth)]
    assert {e["reduction"] for e in native} == {patch} and {e["chs"] for e in info} == {chs}
    with torch.device("meta"):
        feat = fz.create_model(name, features_only=True, out_indices="pyramid")
    pyr = feat.feature_info
    assert pyr.reduction() == [4, 8, 16, 32]
    last = f"blocks.{depth - 1}"
    assert [e["native"] for e in pyr] == [s == patch for s in (4, 8, 16, 32)]
    assert pyr.module_name() == [last if s == patch else f"{last}@{s}" for s in (4, 8, 16, 32)]
    # Index 0 is the first block (the contract's "fewer parameters" check relies on it).
    assert info[0]["name"] == "blocks.0"


def test_derived_levels_are_resampled_last_block(tiny):
    feat = _features_of(tiny, out_indices="pyramid")  # 4x4 grid at 64 px: levels 16x16, 8x8, 4x4, 2x2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = feat(x)
        last = tiny.forward_levels(x, [[e["name"] for e in tiny.feature_info].index("blocks.3")])[0]
    assert [tuple(o.shape) for o in outs] == [(2, 48, 16, 16), (2, 48, 8, 8), (2, 48, 4, 4), (2, 48, 2, 2)]
    assert torch.equal(outs[2], last)
    torch.testing.assert_close(outs[0], F.interpolate(last, scale_factor=4, mode="bilinear"), rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1], F.interpolate(last, scale_factor=2, mode="bilinear"), rtol=0, atol=1e-6)
    assert torch.equal(outs[3], F.max_pool2d(last, 2))
    assert all(o.is_contiguous() for o in outs)
    # Odd grids: the max pool rounds up (a 5x3 map gives 3x2), a 1x1 map stays 1x1.
    assert derive_level(torch.randn(1, 2, 5, 3), 16, 32).shape == (1, 2, 3, 2)
    assert derive_level(torch.randn(1, 2, 1, 1), 16, 64).shape == (1, 2, 1, 1)


def test_features_are_the_classifiers_own_activations(tiny):
    """At the native size every block's map is bit-identical to the tokens the classifier computes."""
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
    for block, i in enumerate(native):
        expected = seen[block][:, 1:].transpose(1, 2).reshape(2, 48, 4, 4)
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
        _, hw_seen = tiny._embed(x)
    assert hw_seen == grid
    assert [tuple(o.shape[-2:]) for o in outs] == [(grid[0] * 4, grid[1] * 4), (grid[0] * 2, grid[1] * 2), grid,
                                                   (-(-grid[0] // 2), -(-grid[1] // 2))]
    # What is added is timm's bicubic resampling of the 4x4 table (the class token's entry kept)...
    pe = resample_pos_embed(tiny.pos_embed, grid, (4, 4), num_prefix_tokens=1)
    assert pe.shape == (1, 1 + grid[0] * grid[1], 48) and torch.equal(pe[:, :1], tiny.pos_embed[:, :1])
    assert not torch.equal(pe[:, 1:17], tiny.pos_embed[:, 1:])
    # ... and at the native grid the table itself, untouched.
    assert resample_pos_embed(tiny.pos_embed, (4, 4), (4, 4), num_prefix_tokens=1) is tiny.pos_embed


def test_first_level_only_holds_and_computes_nothing_later(tiny):
    feat = _features_of(tiny, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("blocks.0.") for k in keys)
    assert not any(k.startswith(("blocks.1.", "norm.", "head.")) for k in keys)
    fired = []
    hook = tiny.blocks[1].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(tiny.forward_levels(x, [0])) == 1
            assert not fired
            tiny.forward_levels(x, [len(tiny.feature_info) - 1])  # a derived level needs the last block
            assert fired
    finally:
        hook.remove()
    # A derived level keeps every block.
    derived = [i for i, e in enumerate(tiny.feature_info) if not e["native"]]
    assert any(k.startswith("blocks.3.") for k in _features_of(tiny, out_indices=derived[:1]).state_dict())


def test_inputs_smaller_than_the_patch_are_refused(tiny):
    feat = _features_of(tiny, out_indices=[0, -1])
    with torch.no_grad():
        assert [tuple(o.shape) for o in feat(torch.randn(1, 3, 16, 40))] == [(1, 48, 1, 2), (1, 48, 1, 1)]
        with pytest.raises(ValueError, match="smaller than the 16-px patch"):
            feat(torch.randn(1, 3, 15, 40))


# -- timm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, twin", [
    ("vit_b_16_224", "vit_base_patch16_224"), ("vit_b_16_384", "vit_base_patch16_384"),
    ("vit_b_32_224", "vit_base_patch32_224"), ("vit_b_32_384", "vit_base_patch32_384"),
    ("vit_l_16_224", "vit_large_patch16_224"), ("vit_l_16_384", "vit_large_patch16_384"),
    ("vit_l_32_224", "vit_large_patch32_224"),
])
def test_timm_models_hold_our_parameters(name, twin):
    """Same names and shapes (timm's vit_large_patch32_224 defaults to no head: it is built with 1000
    classes here, and is therefore no declared twin; the others are, and test_timm_weights checks them)."""
    with torch.device("meta"):
        ours = fz.create_model(name)
        theirs = timm.create_model(twin, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert (fz.get_model_cfg(name).timm_twin == twin) == (name != "vit_l_32_224")


def _as_timm_computes(model):
    """Our model with timm's LayerNorm eps (1e-6) and exact GELU: MindCV's two differences swapped back."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
        if isinstance(m, torch.nn.GELU):
            m.approximate = "none"
    return model


def test_timm_weights_give_timm_outputs(monkeypatch, tiny):
    """timm's VisionTransformer has our parameter names (the registered names' twins are checked
    tensor by tensor in test_timm_weights); with MindCV's LayerNorm eps 1e-7 and tanh GELU swapped for
    timm's, logits and per-block features agree, at the native size and at a non-square size where both
    resample the position embedding bicubically. (timm resamples with ``antialias=True``, which also
    changes upsampling: PIL's cubic a=-0.5 instead of -0.75; featurezoo's resample_pos_embed does not
    antialias, so timm's is switched to it here.)"""
    import timm.models.vision_transformer as timm_vit

    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed",
                        partial(timm_vit.resample_abs_pos_embed, antialias=False))
    theirs = timm_vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=4,
                                        num_classes=10, dynamic_img_size=True).eval()
    assert set(theirs.state_dict()) == set(tiny.state_dict())
    theirs.load_state_dict(tiny.state_dict())
    native = [i for i, e in enumerate(tiny.feature_info) if e["native"]]
    feat = _as_timm_computes(_features_of(tiny, out_indices=native))
    swapped = _as_timm_computes(copy.deepcopy(tiny))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs_logits = theirs(x)
        torch.testing.assert_close(swapped(x), theirs_logits, rtol=1e-4, atol=1e-4)
        assert (tiny(x) - theirs_logits).abs().max() > 1e-4  # the differences are real
        for size in ((64, 64), (96, 144)):
            x = torch.randn(1, 3, *size)
            ref = theirs.forward_intermediates(x, intermediates_only=True)
            outs = feat(x)
            assert len(outs) == len(ref) == 4
            for a, b in zip(outs, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
