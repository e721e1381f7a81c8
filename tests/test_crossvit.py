"""CrossViT checks beyond the generic contract and MindCV parity tests.

CrossViT's features are both branches' patch tokens after each multi-scale block
(branch-major, fixed 20x20 and 14x14 grids whatever the input, each branch resizing
the input to its own size), served by ``forward_levels`` (the classifier's own block
loop). These tests check the declared levels, that features are the classifier's own
activations, the branch resize at other sizes, pruning, MindCV's checkpoint names and
agreement with timm's ``crossvit_*_240`` once MindCV's differences are swapped back.
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.checkpoint.mapping import MINDSPORE_LEAVES, rename_by_rules
from featurezoo.features import FeatureExtractWrapper
from tests.reference import load_meta
from tests.zoo import ref_args

NAMES = ("crossvit_9", "crossvit_15", "crossvit_18")
WIDTHS = {"crossvit_9": (128, 256), "crossvit_15": (192, 384), "crossvit_18": (224, 448)}


def _randomise_ln(model, seed=1):
    """LayerNorms that are not the identity, so that outputs depend on every norm parameter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _randomise_ln(fz.create_model("crossvit_9"))


def _features(full, out_indices=None):
    return FeatureExtractWrapper(copy.deepcopy(full), out_indices=out_indices, model_name="crossvit_9").eval()


# -- declared levels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_is_both_branches_after_each_block_branch_major(name):
    info = fz.get_feature_info(name)
    small, large = WIDTHS[name]
    assert info.module_name() == [f"blocks.{i}.blocks.{d}" for d in (0, 1) for i in (0, 1, 2)]
    assert info.channels() == [small] * 3 + [large] * 3
    assert [e["grid"] for e in info] == [(20, 20)] * 3 + [(14, 14)] * 3
    # The strides at the native size, rounded: 240 / 20, 240 / 14 = 17.14; 224 / 20 = 11.2, 224 / 14.
    assert info.reduction() == ([12] * 3 + [17] * 3 if name == "crossvit_9" else [11] * 3 + [16] * 3)
    assert [e["stage"] for e in info] == [1, 2, 3] * 2
    assert not fz.get_model_cfg(name).input_sides
    pyramid = fz.get_feature_info(name, out_indices="pyramid")
    assert pyramid.module_name() == ["blocks.2.blocks.0", "blocks.2.blocks.1"]  # each branch's last map
    # timm's feature_info: the same levels in the same order and channels; its large-branch reduction is
    # round(17.14) = 17 (README: where our pyramid differs from timm's).
    with torch.device("meta"):
        theirs = timm.create_model(fz.get_model_cfg(name).timm_twin)
    assert [e["num_chs"] for e in theirs.feature_info] == info.channels()
    assert [e["reduction"] for e in theirs.feature_info] == [12] * 3 + [17] * 3


# -- features are the classifier's activations --------------------------------------------------------------


def test_features_are_the_classifiers_own_activations(model):
    """At 240 px each map is bit-identical to the patch tokens the classifier's branch blocks compute."""
    seen = {}
    hooks = [model.blocks[i].blocks[d].register_forward_hook(lambda m, a, out, key=(d, i): seen.__setitem__(key, out))
             for i in range(3) for d in range(2)]
    x = torch.randn(2, 3, 240, 240)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        outs = _features(model)(x)
    for idx, out in enumerate(outs):
        d, i = divmod(idx, 3)
        tokens = seen[(d, i)][:, 1:]
        side = (20, 14)[d]
        expected = tokens.transpose(1, 2).reshape(2, -1, side, side)
        assert out.is_contiguous() and torch.equal(out, expected), f"branch {d} block {i}"


@pytest.mark.parametrize("hw", [(240, 240), (67, 83), (8, 8), (400, 256)])
def test_any_size_runs_on_the_fixed_grids(model, hw):
    feat = _features(model)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        outs = feat(x)
        assert model(x).shape == (1, 1000)
    assert [tuple(o.shape) for o in outs] == [(1, 128, 20, 20)] * 3 + [(1, 256, 14, 14)] * 3


def test_each_branch_resizes_bilinear_with_align_corners(model):
    """A branch's block-0 map depends only on its own input: at a 67x83 input it equals the map of the
    input resized beforehand to the branch's size by bilinear interpolation with align_corners=True
    (MindCV's), and not that of timm's bicubic resize."""
    feat = _features(model, out_indices=[0, 3])
    x = torch.randn(1, 3, 67, 83)
    with torch.no_grad():
        small, large = feat(x)
        for out, idx, side in ((small, 0, 240), (large, 1, 224)):
            ours = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=True)
            bicubic = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
            assert torch.equal(out, feat(ours)[idx])
            assert (out - feat(bicubic)[idx]).abs().max() > 1e-3


# -- pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level, kept, absent, runs, silent", [
    (0, ("patch_embed.0.", "pos_embed.0", "cls_token.0", "blocks.0.blocks.0."),
     ("patch_embed.1.", "pos_embed.1", "cls_token.1", "blocks.0.blocks.1.", "blocks.0.projs.", "blocks.0.fusion.",
      "blocks.1.", "norm.", "head."),
     "blocks.0.blocks.0", ("patch_embed.1", "blocks.0.blocks.1", "blocks.0.fusion.0", "blocks.1.blocks.0")),
    (3, ("patch_embed.1.", "pos_embed.1", "cls_token.1", "blocks.0.blocks.1."),
     ("patch_embed.0.", "pos_embed.0", "cls_token.0", "blocks.0.blocks.0.", "blocks.0.fusion.", "blocks.1."),
     "blocks.0.blocks.1", ("patch_embed.0", "blocks.0.blocks.0", "blocks.0.fusion.1", "blocks.1.blocks.1")),
    (2, ("patch_embed.1.", "blocks.1.fusion.", "blocks.2.blocks.0."),
     ("blocks.2.blocks.1.", "blocks.2.projs.", "blocks.2.fusion.", "blocks.2.revert_projs.", "norm.", "head."),
     "blocks.1.fusion.0", ("blocks.2.blocks.1", "blocks.2.projs.0", "blocks.2.fusion.1", "norm.0")),
])
def test_a_level_holds_and_computes_nothing_it_does_not_need(model, level, kept, absent, runs, silent):
    keys = set(_features(model, out_indices=[level]).state_dict())
    for prefix in kept:
        assert any(k.startswith(prefix) for k in keys), prefix
    for prefix in absent:
        assert not any(k.startswith(prefix) for k in keys), prefix
    # The complete model asked for the same level runs none of the modules the pruned one lacks (the probes
    # are modules that are called: Sequentials, not the ModuleLists that hold them).
    fired = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda *a, n=n: fired.append(n)) for n in (runs, *silent)]
    try:
        with torch.no_grad():
            out = model.forward_levels(torch.randn(1, 3, 240, 240), [level])
    finally:
        for h in hooks:
            h.remove()
    assert len(out) == 1 and fired == [runs]


# -- MindCV checkpoint names --------------------------------------------------------------------------------


def _leaf(name):
    head, _, leaf = name.rpartition(".")
    return f"{head}.{MINDSPORE_LEAVES[leaf]}" if leaf in MINDSPORE_LEAVES else name


@pytest.mark.parametrize("name", NAMES)
def test_mindcv_saved_names_map_exactly_and_module_paths_pass(name):
    rules = fz.get_model_cfg(name).mindcv_renames
    with torch.device("meta"):
        ours = fz.create_model(name)
    keys = set(ours.state_dict())
    saved = list(load_meta(name, **ref_args(name))["param_shapes"])  # MindCV's param.name, as a .ckpt holds them
    assert any(k.startswith("0.blocks.0.2.") for k in saved) and any(k.startswith("0.fusion.") for k in saved)
    mapped = [_leaf(k) for k in rename_by_rules(dict.fromkeys(saved), rules)]
    assert len(set(mapped)) == len(saved) and set(mapped) == keys
    # MindCV's module paths (parameters_and_names()) are ours with MindSpore's leaves: the rules leave them be.
    paths = [k.replace(".weight", ".gamma").replace(".bias", ".beta")
             if isinstance(ours.get_submodule(k.rpartition(".")[0]), torch.nn.LayerNorm) else k for k in keys]
    assert list(rename_by_rules(dict.fromkeys(paths), rules)) == paths


# -- timm ----------------------------------------------------------------------------------------------------


def _as_timm_computes(model):
    """MindCV's three differences swapped for timm's: LayerNorm eps 1e-6 (MindSpore's default 1e-7 in the
    blocks and fusion), exact GELU (MindSpore's tanh approximation), bicubic branch resize without
    align_corners (MindCV: bilinear, align_corners=True)."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
        if isinstance(m, torch.nn.GELU):
            m.approximate = "none"
    model.resize_mode, model.resize_align_corners = "bicubic", False
    return model


def test_timm_weights_give_timm_outputs(model):
    theirs = timm.create_model("crossvit_9_240").eval()
    ours = copy.deepcopy(model)
    report = fz.load_checkpoint(ours, _randomise_ln(theirs).state_dict())  # timm's names, detected
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours(x) - expected).abs().max() > 1e-3  # the differences are real
        _as_timm_computes(ours)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
        feats = _features(ours)
        ref = theirs.forward_intermediates(x, intermediates_only=True)
        outs = feats(x)
    assert len(outs) == len(ref) == 6
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
