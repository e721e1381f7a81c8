"""GhostNet, MixNet, MnasNet, MobileNetV1, ShuffleNetV1/V2 and SqueezeNet: checks beyond
the generic contract and MindCV parity tests.

MindCV registers no ``feature_info`` for these families; ours has one entry per
distinct reduction, at the last layer that outputs that resolution. Here the
pyramids are compared with timm's (same-architecture twins) and torchvision's
(ShuffleNetV2, SqueezeNet), and the "last layer" rule is checked against a real
forward pass.
"""
import math

import pytest
import timm
import torch
import torchvision

import featurezoo as fz

FAMILY = [
    "ghostnet_050", "ghostnet_100", "ghostnet_130",
    "mixnet_s", "mixnet_m", "mixnet_l",
    "mnasnet_050", "mnasnet_075", "mnasnet_100", "mnasnet_130", "mnasnet_140",
    "mobilenet_v1_025", "mobilenet_v1_050", "mobilenet_v1_075", "mobilenet_v1_100",
    "shufflenet_v1_g3_05", "shufflenet_v1_g3_10", "shufflenet_v1_g3_15", "shufflenet_v1_g3_20",
    "shufflenet_v1_g8_05", "shufflenet_v1_g8_10", "shufflenet_v1_g8_15", "shufflenet_v1_g8_20",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1",
]
SQUEEZENETS = ("squeezenet1_0", "squeezenet1_1")


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return fz.create_model(name, **kwargs)


def _timm_info(name):
    with torch.device("meta"):
        return timm.create_model(name, features_only=True, pretrained=False).feature_info


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _timm_twin_has_same_size(ours, theirs):
    with torch.device("meta"):
        return _num_params(fz.create_model(ours)) == _num_params(timm.create_model(theirs))


# --------------------------------------------------------------------------- our rule, checked for real


def test_family_is_registered_with_features():
    assert set(FAMILY) <= set(fz.list_models(features_only=True))


@pytest.mark.parametrize("name", FAMILY)
def test_one_entry_per_reduction_at_the_last_layer_of_that_resolution(name):
    model = fz.create_model(name).eval()
    info = model.feature_info
    reductions = [e["reduction"] for e in info]
    expected = [2, 4, 8, 16] if name in SQUEEZENETS else [2, 4, 8, 16, 32]
    assert reductions == expected
    assert fz.get_feature_info(name, out_indices="pyramid") == info  # "pyramid" keeps every entry

    # For each entry, the module that runs right after it (its next sibling, or its container's)
    # must change the resolution, or be the head.
    outputs = {}
    hooks = []
    watched = {}
    for entry in info:
        after = _next_module(model, entry["name"])
        watched[entry["name"]] = after
        for n in (entry["name"], after):
            hooks.append(model.get_submodule(n).register_forward_hook(
                lambda _m, _i, out, n=n: outputs.setdefault(n, out)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    for entry in info:
        feat, nxt = outputs[entry["name"]], outputs[watched[entry["name"]]]
        assert feat.shape[1] == entry["chs"], entry
        assert nxt.ndim != 4 or nxt.shape[-2:] != feat.shape[-2:], (
            f"{name}: {watched[entry['name']]} still outputs {tuple(feat.shape[-2:])}, so {entry['name']} is not "
            f"the last layer at reduction {entry['reduction']}")


def _next_module(model, name):
    parent, _, leaf = name.rpartition(".")
    siblings = list((model.get_submodule(parent) if parent else model)._modules)
    i = siblings.index(leaf)
    if i + 1 < len(siblings):
        return f"{parent}.{siblings[i + 1]}" if parent else siblings[i + 1]
    return _next_module(model, parent)


# --------------------------------------------------------------------------- timm twins

# Same architecture and, for every twin, the same parameter count.
MNASNET_TWINS = [("mnasnet_050", "mnasnet_050"), ("mnasnet_075", "mnasnet_075"), ("mnasnet_100", "mnasnet_100"),
                 ("mnasnet_140", "mnasnet_140")]  # timm has no mnasnet_130
MIXNET_TWINS = [("mixnet_s", "mixnet_s"), ("mixnet_m", "mixnet_m"), ("mixnet_l", "mixnet_l")]
GHOSTNET_TWINS = [("ghostnet_050", "ghostnet_050"), ("ghostnet_100", "ghostnet_100"),
                  ("ghostnet_130", "ghostnet_130")]


def test_mobilenet_v1_pyramid_matches_timm():
    # timm has only the 1.0 (and 1.25) widths. No deliberate difference: the same blocks.
    assert _timm_twin_has_same_size("mobilenet_v1_100", "mobilenetv1_100")
    ours = fz.get_feature_info("mobilenet_v1_100", out_indices="pyramid")
    theirs = _timm_info("mobilenetv1_100")
    assert ours.reduction() == theirs.reduction()
    assert ours.channels() == theirs.channels() == [64, 128, 256, 512, 1024]


@pytest.mark.parametrize("ours, theirs", MNASNET_TWINS)
def test_mnasnet_pyramid_matches_timm_but_for_the_head_conv(ours, theirs):
    assert _timm_twin_has_same_size(ours, theirs)
    pyramid = fz.get_feature_info(ours, out_indices="pyramid")
    ref = _timm_info(theirs)
    assert pyramid.reduction() == ref.reduction()
    assert pyramid.channels()[:-1] == ref.channels()[:-1]
    # Deliberate difference at stride 32: MindCV's ``features`` ends with the 1x1 conv to 1280
    # channels (bn, ReLU), the last layer at that resolution, as in MindCV's own mobilenet_v2
    # feature_info; timm stops at the last block (320 * alpha channels), which feeds that conv.
    head_conv = _meta_model(ours).features[-3]
    assert pyramid.channels(-1) == head_conv.out_channels == 1280
    assert ref.channels(-1) == head_conv.in_channels


@pytest.mark.parametrize("ours, theirs", MIXNET_TWINS)
def test_mixnet_pyramid_matches_timm_but_for_the_head_conv(ours, theirs):
    assert _timm_twin_has_same_size(ours, theirs)
    pyramid = fz.get_feature_info(ours, out_indices="pyramid")
    ref = _timm_info(theirs)
    assert pyramid.reduction() == ref.reduction()
    assert pyramid.channels()[:-1] == ref.channels()[:-1]
    # Deliberate difference at stride 32: MindCV's forward_features ends with head_conv (1x1 to
    # 1536, bn, ReLU), the last layer at that resolution; timm stops at the last block, its input.
    head_conv = _meta_model(ours).head_conv[0]
    assert pyramid.module_name(-1) == "head_conv"
    assert pyramid.channels(-1) == head_conv.out_channels == 1536
    assert ref.channels(-1) == head_conv.in_channels


@pytest.mark.parametrize("ours, theirs", GHOSTNET_TWINS)
def test_ghostnet_pyramid_matches_timm_where_both_take_the_stage_end(ours, theirs):
    assert _timm_twin_has_same_size(ours, theirs)
    pyramid = fz.get_feature_info(ours, out_indices="pyramid")
    ref = _timm_info(theirs)
    assert pyramid.reduction() == ref.reduction()
    assert pyramid.channels()[:3] == ref.channels()[:3]
    # Deliberate difference at strides 16 and 32: timm registers the stride-2 stage that opens each
    # resolution (blocks.5: 80 * width channels, blocks.7: 160 * width); the stages after it at the
    # same resolution widen to 112 * width (blocks.6) and end with the 1x1 ConvBnAct to
    # 960 * width (blocks.9), the last layers at those resolutions, which we register.
    # The two trees use the same indices, so timm's picks are our stages of the same name.
    model = _meta_model(ours)
    assert ref.module_name()[3:] == ["blocks.5", "blocks.7"]
    assert ref.channels()[3:] == [model.blocks[5][-1].ghost2.oup, model.blocks[7][-1].ghost2.oup]
    assert pyramid.module_name()[3:] == ["blocks.6", "blocks.9"]
    assert pyramid.channels()[3:] == [model.blocks[6][-1].ghost2.oup, model.blocks[9].features[0].out_channels]
    assert pyramid.channels(3) > ref.channels(3) and pyramid.channels(4) > ref.channels(4)


@pytest.mark.parametrize("name", ["ghostnet_050", "ghostnet_130"])
def test_ghostnet_with_timm_weights_computes_timms_outputs(name):
    # Odd size on purpose: every GhostNet conv pads symmetrically (or is 1x1), so timm's numbers
    # are ours at any size.
    theirs = timm.create_model(name, pretrained=False).eval()
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    ours = fz.create_model(name).eval()
    report = fz.load_checkpoint(ours, theirs.state_dict(), source="timm")
    assert not report.missing and not report.unexpected
    feat = fz.create_model(name, features_only=True, out_indices=[1, 2])
    fz.load_checkpoint(feat, theirs.state_dict(), source="timm")
    x = torch.randn(2, 3, 67, 67)
    # Same tree, same names: the stages we output are timm's modules of those names.
    ref_feats = _run_with_hooks(theirs, feat.feature_info.module_name(), x)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
        for a, b in zip(feat.eval()(x), ref_feats.values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- torchvision (no timm twin)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
                                  "shufflenet_v2_x2_0"])
def test_shufflenet_v2_pyramid_matches_torchvision_stages(name):
    # MindCV's blocks split channels differently inside the stride-2 blocks (so parameter counts
    # differ), but the stage outputs are torchvision's: conv1, maxpool, stage2, stage3, and at
    # stride 32 conv5 (the last layer there; torchvision's stage4 output is its input).
    tv = getattr(torchvision.models, name)().eval()
    tv_names = ["conv1", "maxpool", "stage2", "stage3", "conv5"]
    tv_out = _run_with_hooks(tv, tv_names, 64)
    ours = fz.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = ours(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [tuple(tv_out[n].shape) for n in tv_names]
    assert ours.feature_info.module_name() == ["first_conv", "max_pool", "features.3", "features.11", "conv_last"]


@pytest.mark.parametrize("name", SQUEEZENETS)
def test_squeezenet_matches_torchvision_but_mindcv_pools_in_floor_mode(name):
    # torchvision's SqueezeNet has MindCV's layer indices and parameter count. Its max pools use
    # ceil mode; MindCV's use pad_mode="valid" (floor), and 1.0's 7x7 stem conv pads nothing,
    # so maps are smaller than ceil(size / reduction): these are MindCV's own sizes at 64 px
    # (checked against MindCV 0.3.0). test_contract's ceil rule cannot hold for this family.
    mindcv_sizes = {"squeezenet1_0": [29, 14, 6, 2], "squeezenet1_1": [32, 15, 7, 3]}[name]
    tv = getattr(torchvision.models, name)().eval()
    model = fz.create_model(name).eval()
    assert _num_params(model) == _num_params(tv)
    feat = fz.create_model(name, features_only=True).eval()
    info = feat.feature_info
    tv_out = _run_with_hooks(tv, info.module_name(), 64)
    with torch.no_grad():
        ours = feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in ours] == [tv_out[n].shape[1] for n in info.module_name()] == info.channels()
    assert [f.shape[-1] for f in ours] == mindcv_sizes
    assert [math.ceil(64 / r) for r in info.reduction()] != mindcv_sizes


def _run_with_hooks(model, names, x):
    """Outputs of the named modules, in the order of ``names``, for input ``x`` (or a random
    1x3xXxX image if ``x`` is an int)."""
    out = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: out.setdefault(n, o))
             for n in names]
    if isinstance(x, int):
        x = torch.randn(1, 3, x, x)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: out[n] for n in names}


# --------------------------------------------------------------------------- family details


def test_squeezenet_final_conv_is_the_classifier_conv_under_one_name():
    model = _meta_model("squeezenet1_0")
    assert model.final_conv is model.classifier[1]
    # MindCV's checkpoints name it classifier.1 only.
    assert not any(k.startswith("final_conv.") for k in model.state_dict())


def test_shufflenet_v2_split_sends_odd_channels_to_the_main_branch():
    from featurezoo.models.shufflenetv2 import ShuffleV2Block

    x = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1, 1)
    passed, main = ShuffleV2Block.channel_shuffle(x)
    assert torch.equal(passed, x[:, 0::2]) and torch.equal(main, x[:, 1::2])


def test_shufflenet_v1_shuffle_is_mindcvs_transpose():
    block = _meta_model("shufflenet_v1_g3_10").features[1]
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1, 1)
    # 6 channels viewed as (C // groups, groups) = (2, 3) and transposed: 0 3 1 4 2 5. (The paper's
    # usual (groups, C // groups) view would give 0 2 4 1 3 5; MindCV's weights expect this order.)
    assert block.channel_shuffle(x).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_mnasnet_batchnorm_is_mindcvs():
    bns = [m for m in _meta_model("mnasnet_100").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == pytest.approx(0.01) for m in bns)
