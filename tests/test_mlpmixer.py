"""MLP-Mixer checks beyond the generic contract and MindCV parity tests.

MLP-Mixer's features are the tokens after each mixer block as NCHW maps at the
patch stride, plus the parameter-free pyramid levels derived from the last
block, served by ``forward_levels`` (the classifier's own block loop). Its
token-mixing MLPs fix the token count, so it runs at 224 px only. These tests
check the levels, that the features are the classifier's own activations, the
refusal of other sizes, pruning, MindCV's checkpoint names, and agreement with
timm's ``MlpMixer`` with the known differences swapped.
"""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer as TimmMixer

import featurezoo as fz
from featurezoo.checkpoint.mapping import rename_by_rules
from featurezoo.features import FeatureExtractWrapper
from featurezoo.models.mlpmixer import MLPMixer

SMALL = dict(depth=3, patch_size=16, image_size=64, dim=32, token_dim=16, channel_dim=128, num_classes=10)


def _randomise(model, seed=1):
    """Weights of order one and LayerNorms that are not the identity, so outputs depend on every tensor and
    GELU leaves its near-linear range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.2, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """A small MLPMixer of the same class (64 px, patch 16: a 4x4 grid of 16 tokens, 3 blocks)."""
    torch.manual_seed(0)
    return _randomise(MLPMixer(**SMALL))


def _features_of(full, **kwargs):
    feat = FeatureExtractWrapper(MLPMixer(**SMALL), **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


# -- feature_info and the pyramid ---------------------------------------------------------------------


@pytest.mark.parametrize("name, depth, patch, chs, pyramid", [
    ("mlp_mixer_s_p16", 8, 16, 512, [4, 8, 16, 32]), ("mlp_mixer_s_p32", 8, 32, 512, [4, 8, 16, 32]),
    ("mlp_mixer_b_p16", 12, 16, 768, [4, 8, 16, 32]), ("mlp_mixer_b_p32", 12, 32, 768, [4, 8, 16, 32]),
    ("mlp_mixer_l_p16", 24, 16, 1024, [4, 8, 16, 32]), ("mlp_mixer_l_p32", 24, 32, 1024, [4, 8, 16, 32]),
    ("mlp_mixer_h_p14", 32, 14, 1280, [14]),
])
def test_feature_info_is_every_block_plus_the_derived_pyramid(name, depth, patch, chs, pyramid):
    info = fz.get_feature_info(name)
    native = [e for e in info if e["native"]]
    assert [e["name"] for e in native] == [f"mixer_blocks.{i}" for i in range(depth)]
    assert {e["reduction"] for e in native} == {patch} and {e["chs"] for e in info} == {chs}
    assert len(info) == depth + len(pyramid) - 1  # the derived levels: the pyramid's other strides
    assert info[0]["name"] == "mixer_blocks.0"
    with torch.device("meta"):
        feat = fz.create_model(name, features_only=True, out_indices="pyramid")
    pyr = feat.feature_info
    last = f"mixer_blocks.{depth - 1}"
    assert pyr.reduction() == pyramid and pyr.channels() == [chs] * len(pyramid)
    assert pyr.module_name() == [last if s == patch else f"{last}@{s}" for s in pyramid]
    assert [e["native"] for e in pyr] == [s == patch for s in pyramid]


def test_size_facts_are_declared():
    for name in fz.list_models("mlp_mixer*"):
        cfg = fz.get_model_cfg(name)
        assert cfg.input_sides == (224,) and cfg.fixed_input_size and cfg.input_size == (3, 224, 224)
        assert "224" in cfg.size_note and not cfg.valid_padding and not cfg.timm_twin
    assert len(fz.list_models("mlp_mixer*")) == 7


def test_pyramid_levels_are_resampled_last_block(tiny):
    feat = _features_of(tiny, out_indices="pyramid")  # 4x4 grid at 64 px: 16x16, 8x8, 4x4, 2x2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = feat(x)
        last = tiny.forward_levels(x, [[e["name"] for e in tiny.feature_info].index("mixer_blocks.2")])[0]
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    assert torch.equal(outs[2], last)
    torch.testing.assert_close(outs[0], F.interpolate(last, scale_factor=4, mode="bilinear"), rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1], F.interpolate(last, scale_factor=2, mode="bilinear"), rtol=0, atol=1e-6)
    assert torch.equal(outs[3], F.max_pool2d(last, 2))
    assert all(o.is_contiguous() for o in outs)


def test_features_are_the_classifiers_own_activations(tiny):
    """Every block's map is bit-identical to the tokens the classifier computes (row-major token grid)."""
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, blk in
             enumerate(tiny.mixer_blocks)]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            logits = tiny(x)
            outs = _features_of(tiny)(x)
    finally:
        for h in hooks:
            h.remove()
    native = [i for i, e in enumerate(tiny.feature_info) if e["native"]]
    assert len(seen) == 3
    for block, i in enumerate(native):
        expected = seen[block].transpose(1, 2).reshape(2, 32, 4, 4)
        assert outs[i].is_contiguous() and torch.equal(outs[i], expected), f"block {block}"
    # The token grid is row-major over the patches: token (r, c) is the patch conv's output at (r, c).
    with torch.no_grad():
        patches = tiny.to_patch_embedding[0](x)
        assert torch.equal(tiny.to_patch_embedding(x)[:, 1 * 4 + 2], patches[:, :, 1, 2])
        torch.testing.assert_close(tiny.mlp_head(tiny.layer_norm(seen[2]).mean(1)), logits, rtol=0, atol=0)


def test_first_level_only_holds_and_computes_nothing_later(tiny):
    feat = _features_of(tiny, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("mixer_blocks.0.") for k in keys)
    assert not any(k.startswith(("mixer_blocks.1.", "layer_norm.", "mlp_head.")) for k in keys)
    fired = []
    hook = tiny.mixer_blocks[1].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(tiny.forward_levels(x, [0])) == 1
            assert not fired
            tiny.forward_levels(x, [len(tiny.feature_info) - 1])  # a derived level needs the last block
            assert fired
    finally:
        hook.remove()
    derived = [i for i, e in enumerate(tiny.feature_info) if not e["native"]]
    assert any(k.startswith("mixer_blocks.2.") for k in _features_of(tiny, out_indices=derived[:1]).state_dict())


# -- input size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(96, 96), (64, 80), (70, 70)])  # (70, 70) still makes a 4x4 grid of 16 tokens
def test_other_sizes_are_refused_before_computing(tiny, hw):
    fired = []
    hook = tiny.to_patch_embedding[0].register_forward_hook(lambda *a: fired.append(1))
    feat = _features_of(tiny, out_indices="pyramid")
    try:
        for model in (tiny, feat):
            with torch.no_grad(), pytest.raises(ValueError, match=r"runs only at 64x64 px.*4x4 = 16 tokens"):
                model(torch.randn(1, 3, *hw))
        assert not fired
    finally:
        hook.remove()


def test_registered_models_refuse_other_sizes_with_the_valid_one():
    with torch.device("meta"):
        feat = fz.create_model("mlp_mixer_h_p14", features_only=True)
        full = fz.create_model("mlp_mixer_s_p32")
        for model, hw in ((feat, (1024, 1024)), (full, (224, 256)), (feat, (800, 1333))):
            with pytest.raises(ValueError, match="runs only at 224x224 px"):
                model(torch.randn(1, 3, *hw))
        assert [tuple(o.shape) for o in feat(torch.randn(1, 3, 224, 224))][-1] == (1, 1280, 16, 16)


# -- MindCV's checkpoint names --------------------------------------------------------------------------


def _mindcv_name(path):
    """The name MindSpore saves for our module path (block 0: '0.<rest>', block i >= 1: '0.token_mix.i.<rest>';
    LayerNorm leaves gamma/beta), as printed by MindCV's param.name."""
    m = re.match(r"^mixer_blocks\.(\d+)\.(.*)$", path)
    if m:
        path = f"0.{m.group(2)}" if m.group(1) == "0" else f"0.token_mix.{m.group(1)}.{m.group(2)}"
    return re.sub(r"(token_mix\.0|channel_mix\.0|layer_norm)\.weight$", r"\1.gamma",
                  re.sub(r"(token_mix\.0|channel_mix\.0|layer_norm)\.bias$", r"\1.beta", path))


def test_mindcv_renames_map_saved_names_onto_module_paths():
    rules = fz.get_model_cfg("mlp_mixer_s_p32").mindcv_renames
    samples = {  # MindCV's param.name -> parameters_and_names() path (printed from MindCV's mlp_mixer_s_p32)
        "0.token_mix.0.gamma": "mixer_blocks.0.token_mix.0.gamma",
        "0.token_mix.2.net.3.bias": "mixer_blocks.0.token_mix.2.net.3.bias",
        "0.channel_mix.1.net.0.weight": "mixer_blocks.0.channel_mix.1.net.0.weight",
        "0.token_mix.1.token_mix.0.gamma": "mixer_blocks.1.token_mix.0.gamma",
        "0.token_mix.1.token_mix.2.net.0.weight": "mixer_blocks.1.token_mix.2.net.0.weight",
        "0.token_mix.7.channel_mix.1.net.3.bias": "mixer_blocks.7.channel_mix.1.net.3.bias",
        "0.token_mix.12.token_mix.2.net.3.weight": "mixer_blocks.12.token_mix.2.net.3.weight",
        "to_patch_embedding.0.weight": "to_patch_embedding.0.weight",
        "layer_norm.gamma": "layer_norm.gamma", "mlp_head.bias": "mlp_head.bias",
    }
    assert rename_by_rules(dict.fromkeys(samples), rules) == dict.fromkeys(samples.values())
    # Module paths (a checkpoint saved with dotted names) pass unchanged.
    assert rename_by_rules(dict.fromkeys(samples.values()), rules) == dict.fromkeys(samples.values())


@pytest.mark.parametrize("form", ["mindspore", "module_paths"])
def test_both_name_forms_load(tiny, form):
    state = {(_mindcv_name(k) if form == "mindspore" else k): v for k, v in tiny.state_dict().items()}
    if form == "mindspore":
        assert "0.token_mix.2.channel_mix.0.gamma" in state and "0.channel_mix.1.net.0.weight" in state
    model = MLPMixer(**SMALL)
    model.default_cfg = fz.get_model_cfg("mlp_mixer_s_p16")  # the family's rename rules
    fz.load_checkpoint(model, state, strict=True)
    for k, v in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# -- timm --------------------------------------------------------------------------------------------------

_FROM_TIMM = (
    (r"^stem\.proj\.", "to_patch_embedding.0."),
    (r"^blocks\.(\d+)\.norm1\.", r"mixer_blocks.\1.token_mix.0."),
    (r"^blocks\.(\d+)\.mlp_tokens\.fc1\.", r"mixer_blocks.\1.token_mix.2.net.0."),
    (r"^blocks\.(\d+)\.mlp_tokens\.fc2\.", r"mixer_blocks.\1.token_mix.2.net.3."),
    (r"^blocks\.(\d+)\.norm2\.", r"mixer_blocks.\1.channel_mix.0."),
    (r"^blocks\.(\d+)\.mlp_channels\.fc1\.", r"mixer_blocks.\1.channel_mix.1.net.0."),
    (r"^blocks\.(\d+)\.mlp_channels\.fc2\.", r"mixer_blocks.\1.channel_mix.1.net.3."),
    (r"^norm\.", "layer_norm."), (r"^head\.", "mlp_head."),
)


def test_timm_mixers_differ_from_ours_only_by_the_stem_bias():
    """timm's mixer_s16_224 under our names holds our parameters plus ``stem.proj.bias``: hence no twin."""
    with torch.device("meta"):
        ours = fz.create_model("mlp_mixer_s_p16")
        theirs = TimmMixer(patch_size=16, num_blocks=8, embed_dim=512)
    converted = {k: v.shape for k, v in rename_by_rules(theirs.state_dict(), _FROM_TIMM).items()}
    assert set(converted) - set(ours.state_dict()) == {"to_patch_embedding.0.bias"}
    del converted["to_patch_embedding.0.bias"]
    assert converted == {k: v.shape for k, v in ours.state_dict().items()}


def _as_timm_computes(model):
    """Our model with timm's LayerNorm eps (1e-6) and exact GELU: MindCV's two differences swapped back."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
        if isinstance(m, torch.nn.GELU):
            m.approximate = "none"
    return model


def test_timm_weights_give_timm_outputs():
    """timm's MlpMixer with its stem bias zeroed and its weights renamed onto ours, our LayerNorm eps 1e-7
    and tanh GELU swapped for timm's: logits and every block's map agree."""
    torch.manual_seed(0)
    theirs = _randomise(TimmMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=3, embed_dim=32), 3)
    with torch.no_grad():
        theirs.stem.proj.bias.zero_()
    state = rename_by_rules(theirs.state_dict(), _FROM_TIMM)
    assert not torch.count_nonzero(state.pop("to_patch_embedding.0.bias"))
    ours = MLPMixer(**SMALL).eval()
    ours.load_state_dict(state)
    native = [i for i, e in enumerate(ours.feature_info) if e["native"]]
    feat = _as_timm_computes(_features_of(ours, out_indices=native))
    swapped = _as_timm_computes(copy.deepcopy(ours))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = theirs(x)
        torch.testing.assert_close(swapped(x), ref, rtol=1e-5, atol=1e-5)
        assert (ours(x) - ref).abs().max() > 1e-4  # the differences are real (10x the agreement)
        inter = theirs.forward_intermediates(x, intermediates_only=True)
        outs = feat(x)
    assert len(outs) == len(inter) == 3
    for a, b in zip(outs, inter):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
