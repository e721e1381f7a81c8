"""XCiT checks beyond the generic contract and MindCV parity tests.

XCiT's features are the conv stem's GELU outputs (strides 2/4/8), then the
tokens after each XCA block as NCHW maps at stride 16, plus the
parameter-free pyramid levels derived from the last block, all served by
``forward_levels`` (the classifier's own stem and block loop). These tests
check the pyramid, that the features are the classifier's own activations,
other input sizes (the Fourier position encoding is computed for the grid),
pruning, and agreement with timm's ``xcit_tiny_12_p16_224`` on the same
weights once MindCV's two differences are swapped into timm, each shown to
matter: (1) MindCV's XCA does not L2-normalise q and k, (2) its GELUs are
tanh approximations. LayerNorm (1e-6) and BatchNorm (1e-5) eps are equal.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.models.xcit import XCiT

NAME = "xcit_tiny_12_p16_224"
STEM = [("patch_embed.proj.1", 24, 2), ("patch_embed.proj.3", 48, 4), ("patch_embed.proj.5", 96, 8)]


def _randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Norms, layer scales, temperatures and projections of order one, so that every part and both
    differences from timm show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.05, generator=g)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma1", "gamma2", "gamma3"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            if name.endswith("temperature"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return _randomise(fz.create_model(NAME))


def _features_of(full, **kwargs):
    feat = fz.create_model(NAME, features_only=True, **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


def _shapes(outs):
    return [tuple(o.shape) for o in outs]


# -- feature_info and the pyramid ------------------------------------------------------------------------


def test_feature_info_is_stem_then_blocks_then_derived_levels():
    info = fz.get_feature_info(NAME)
    assert [(e["name"], e["chs"], e["reduction"]) for e in info][:3] == STEM
    native = [e for e in info[3:] if e["native"]]
    assert [e["name"] for e in native] == [f"blocks.{i}" for i in range(12)]
    assert {(e["chs"], e["reduction"]) for e in native} == {(192, 16)}
    derived = [(e["name"], e["reduction"]) for e in info if not e["native"]]
    assert derived == [("blocks.11@4", 4), ("blocks.11@8", 8), ("blocks.11@32", 32)]
    # The stem entries are the GELUs after the conv+BN of the channels they declare.
    with torch.device("meta"):
        model = fz.create_model(NAME)
    for name, chs, _ in STEM:
        j = int(name.rsplit(".", 1)[1])
        assert isinstance(model.get_submodule(name), nn.GELU)
        assert model.patch_embed.proj[j - 1][0].out_channels == chs
    # "pyramid" = the last entry at each reduction: the stem's stride-2 map, the levels derived from the last
    # block at 4 and 8, the last block, its stride-32 pool (the stem's own 4/8 maps are entries 1 and 2).
    with torch.device("meta"):
        pyr = fz.create_model(NAME, features_only=True, out_indices="pyramid")
    assert pyr.out_indices == [0, 14, 15, 16, 17]
    assert pyr.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert pyr.feature_info.module_name() == ["patch_embed.proj.1", "blocks.11@4", "blocks.11@8", "blocks.11",
                                              "blocks.11@32"]
    assert [e["native"] for e in pyr.feature_info] == [True, False, False, True, False]
    # timm lists the 12 blocks only, with the same channels and stride.
    with torch.device("meta"):
        theirs = timm.create_model(NAME, pretrained=False)
    assert [(e["num_chs"], e["reduction"]) for e in theirs.feature_info] == [(e["chs"], e["reduction"])
                                                                              for e in native]


def test_features_are_the_classifiers_own_activations(full):
    """At the native size (224 px) every map is bit-identical to what the classifier computes."""
    seen = {}
    modules = {name: full.get_submodule(name) for name, _, _ in STEM}
    modules.update({f"blocks.{i}": blk for i, blk in enumerate(full.blocks)})
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n, m in modules.items()]
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            full(x)
    finally:
        for h in hooks:
            h.remove()
    feat = _features_of(full, out_indices=[i for i, e in enumerate(full.feature_info) if e["native"]])
    with torch.no_grad():
        outs = feat(x)
    assert len(outs) == 15
    for out, entry in zip(outs, feat.feature_info):
        expected = seen[entry["name"]]
        if expected.dim() == 3:  # block tokens
            expected = expected.transpose(1, 2).reshape(1, 192, 14, 14)
        assert out.is_contiguous() and torch.equal(out, expected), entry["name"]


def test_derived_levels_are_resampled_last_block(full):
    feat = _features_of(full, out_indices="pyramid")  # 64 px: a 4x4 grid
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = feat(x)
        stem2, last = full.forward_levels(x, [0, 16])
    assert _shapes(outs) == [(2, 24, 32, 32), (2, 192, 16, 16), (2, 192, 8, 8), (2, 192, 4, 4), (2, 192, 2, 2)]
    assert torch.equal(outs[0], stem2) and torch.equal(outs[3], last)
    torch.testing.assert_close(outs[1], F.interpolate(last, scale_factor=4, mode="bilinear"), rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[2], F.interpolate(last, scale_factor=2, mode="bilinear"), rtol=0, atol=1e-6)
    assert torch.equal(outs[4], F.max_pool2d(last, 2))
    assert all(o.is_contiguous() for o in outs)


# -- other input sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(96, 96), (67, 83)])
def test_other_sizes_give_ceil_maps(full, hw):
    """Every level is ceil(size / reduction), like a CNN's: the stem pads, the position encoding is computed
    for the token grid, and the derived finer levels are the x4 / x2 upsampled grid cropped to the image
    (67x83: a 5x6 grid, 20x24 at stride 4, cropped to 17x21)."""
    h, w = hw
    feat = _features_of(full)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        outs = feat(x)
        assert full(x).shape == (1, 1000)  # the classifier runs there too, as MindCV's
        (last,) = full.forward_levels(x, [16])
    assert _shapes(outs) == [(1, e["chs"], math.ceil(h / e["reduction"]), math.ceil(w / e["reduction"]))
                             for e in feat.feature_info]
    grid = (math.ceil(h / 16), math.ceil(w / 16))
    up = F.interpolate(last, size=(grid[0] * 4, grid[1] * 4), mode="bilinear")
    torch.testing.assert_close(outs[14], up[..., :math.ceil(h / 4), :math.ceil(w / 4)], rtol=0, atol=1e-6)
    assert (grid[0] * 4, grid[1] * 4) != tuple(outs[14].shape[-2:]) or h % 16 == 0 == w % 16


def test_detector_and_tiny_sizes():
    with torch.device("meta"):
        feat = fz.create_model(NAME, features_only=True, out_indices="pyramid")
        assert _shapes(feat(torch.randn(1, 3, 800, 1333))) == [(1, 24, 400, 667), (1, 192, 200, 334),
                                                                (1, 192, 100, 167), (1, 192, 50, 84),
                                                                (1, 192, 25, 42)]
    feat = fz.create_model(NAME, features_only=True, out_indices="pyramid").eval()
    with torch.no_grad():  # a 1x1 px input is a 1x1 grid at every stride
        assert _shapes(feat(torch.randn(1, 3, 1, 1))) == [(1, 24, 1, 1)] + [(1, 192, 1, 1)] * 4


def test_position_encoding_is_timms_for_any_grid(full):
    """The Fourier encoding (no learned table to resample) equals timm's for the same projection."""
    from timm.models.xcit import PositionalEncodingFourier as TimmPE

    theirs = TimmPE(dim=192)
    theirs.load_state_dict(full.pos_embeder.state_dict())
    for hw in ((14, 14), (5, 6), (1, 3)):
        with torch.no_grad():
            torch.testing.assert_close(full.pos_embeder(hw), theirs(1, *hw), rtol=0, atol=1e-6)


def test_unsupported_patch_size_is_refused():
    with pytest.raises(ValueError, match="patch_size 8 or 16"):
        XCiT(patch_size=12, embed_dim=48, depth=1, num_heads=2)


# -- pruning --------------------------------------------------------------------------------------------------


def test_first_level_only_holds_and_computes_nothing_later(full):
    feat = _features_of(full, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("patch_embed.proj.0.") for k in keys)
    assert not any(k.startswith(("patch_embed.proj.2.", "blocks.", "pos_embeder.")) for k in keys)
    fired = []
    hooks = [full.patch_embed.proj[2].register_forward_hook(lambda *a: fired.append("proj.2")),
             full.blocks[1].register_forward_hook(lambda *a: fired.append("blocks.1")),
             full.cls_attn_blocks[0].register_forward_hook(lambda *a: fired.append("cls_attn"))]
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert _shapes(full.forward_levels(x, [0])) == [(1, 24, 32, 32)]
            assert fired == []
            full.forward_levels(x, [3])  # blocks.0
            assert fired == ["proj.2"]
            full.forward_levels(x, list(range(len(full.feature_info))))
            assert fired == ["proj.2", "proj.2", "blocks.1"]  # the class attention never runs for features
    finally:
        for h in hooks:
            h.remove()


def test_feature_models_drop_the_class_token_path(full):
    for out_indices in ([3], None):
        keys = set(_features_of(full, out_indices=out_indices).state_dict())
        assert not any(k.startswith(("cls_token", "cls_attn_blocks.", "norm.", "head.")) for k in keys)
        assert any(k.startswith("pos_embeder.") for k in keys)
    assert not any(k.startswith("blocks.1.") for k in _features_of(full, out_indices=[3]).state_dict())


# -- timm --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = _randomise(timm.create_model(NAME, pretrained=False), seed=2)
    ours = fz.create_model(NAME).eval()
    report = fz.load_checkpoint(ours, theirs.state_dict())  # timm names, converted (q/k/v fused into qkv)
    assert not report.missing and not report.unexpected
    return ours, theirs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _set_timm_gelu(model, approximate):
    n = 0
    for m in model.modules():
        if isinstance(m, nn.GELU):
            m.approximate = approximate
            n += 1
    assert n == 3 + 12 * 2 + 2  # stem, LPI + MLP per block, class-attention MLPs


def test_norm_eps_equal_timms(pair):
    ours, theirs = pair
    eps = lambda model: {n: (type(m).__name__, m.eps) for n, m in model.named_modules()  # noqa: E731
                         if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))}
    assert eps(ours) == eps(theirs) and len(eps(ours)) == 4 + 12 * 4 + 2 * 2 + 1
    assert set(eps(ours).values()) == {("LayerNorm", 1e-6), ("BatchNorm2d", 1e-5)}


# Measured: both swapped, logits agree to 3.6e-7 of max|logit| (64 px) and 3.4e-7 (48x80); timm as is or with
# only the GELUs swapped differs by 0.54 / 0.58, with only the normalisation swapped by 5.6e-4 / 7.3e-4.
TOL = 1e-5


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_timm_with_mindcvs_differences_gives_our_outputs(pair, monkeypatch, size):
    """timm with tanh GELUs and without the q/k normalisation computes our logits and per-block features
    (timm's ``forward_intermediates``); either swap alone leaves a difference of at least 10x the tolerance."""
    ours, theirs = pair
    x = torch.randn(2, 3, *size)
    native = [i for i, e in enumerate(ours.feature_info) if e["native"]][3:]
    with torch.no_grad():
        logits = ours(x)
        blocks = ours.forward_levels(x, native)
        assert _rel(theirs(x), logits) > 0.1  # timm as is
        _set_timm_gelu(theirs, "tanh")
        try:
            assert _rel(theirs(x), logits) > 0.1  # only the GELU swapped
            with monkeypatch.context() as mp:
                mp.setattr(torch.nn.functional, "normalize", lambda t, dim=-1, **kw: t)  # timm's XCA q, k
                torch.testing.assert_close(theirs(x), logits, rtol=0, atol=TOL * logits.abs().max().item())
                ref = theirs.forward_intermediates(x, intermediates_only=True)
                assert len(ref) == len(blocks) == 12
                for a, b in zip(blocks, ref):
                    torch.testing.assert_close(a, b, rtol=0, atol=TOL * b.abs().max().item())
        finally:
            _set_timm_gelu(theirs, "none")
        with monkeypatch.context() as mp:
            mp.setattr(torch.nn.functional, "normalize", lambda t, dim=-1, **kw: t)
            assert _rel(theirs(x), logits) > 10 * TOL  # only the normalisation swapped: the GELUs still differ
