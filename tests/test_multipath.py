"""Families with parallel paths and concatenations: DenseNet, DPN, GoogLeNet,
Inception v3/v4, Xception.

Checked here beyond the generic contract and MindCV parity tests:

* the pyramid agrees with timm's feature_info (channels, reductions) and,
  run at the same odd size, with timm's feature map sizes;
* a feature model computes nothing past its deepest feature, and every
  early feature equals the same entry of the all-indices model;
* the classifier and the feature model share one forward;
* auxiliary heads exist in the classifier (training only) and not in feature models.

Deliberate differences from timm:

* inception_v4, stride 4: timm taps ``Mixed3a`` (160 channels, the first
  stride-4 map); we tap the end of the stride-4 part of the stem, after
  ``mixed_4a`` (192 channels): one entry per reduction, at the end of its stage.
  At 99 px timm's map is 23x23, ours 21x21 (mixed_4a's unpadded 3x3 convs).
* xception, strides 4/8/16: timm taps ``blockN.rep.0``, the ReLU that starts
  the next block, i.e. the activated block output; ours are the block outputs
  themselves (``blocks.0``, ``blocks.1``, ``blocks.10``), the residual sums
  before that ReLU. Channels, reductions and sizes agree.
* densenet/dpn, stride 2: timm taps its stem BN+act (``features.norm0``,
  ``features.conv1_1``); ours is the same map at MindCV's stem ReLU.

Valid-padded models (Inception v3/v4, Xception's stem) and DenseNet's
transitions at odd sizes round sizes down exactly as timm does: the expected
sizes below come from timm, not from ``ceil(size / reduction)``.
"""
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import featurezoo as fz
from featurezoo.features import SequentialFeatures

# (ours, timm's same-architecture model, entries where the two differ on purpose)
TIMM_TWINS = [
    ("densenet121", "densenet121", ()),
    ("dpn92", "dpn92", ()),
    ("inception_v3", "inception_v3", ()),
    ("inception_v4", "inception_v4", (1,)),
    ("xception", "legacy_xception", ()),
]
# One name per family (the other variants differ only in widths and depths).
FAMILY = ["densenet121", "dpn92", "googlenet", "inception_v3", "inception_v4", "xception"]
# Inception v3/v4 shrink a 64 px input to nothing (see test_inception_minimum_input_size).
SIZE = {"inception_v3": 99, "inception_v4": 99}
ODD_SIZE = 99


def _timm(name, meta=True):
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, features_only=True, pretrained=False)
    return timm.create_model(name, features_only=True, pretrained=False).eval()


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _features(name, state, out_indices):
    model = fz.create_model(name, features_only=True, out_indices=out_indices).eval()
    own = model.state_dict()
    model.load_state_dict({k: state[k] for k in own})
    return model


def _flops(model, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("ours, theirs, differ", TIMM_TWINS)
def test_pyramid_agrees_with_timm(ours, theirs, differ):
    pyramid = fz.get_feature_info(ours, out_indices="pyramid")
    ref = _timm(theirs).feature_info
    assert pyramid.reduction() == ref.reduction() == [2, 4, 8, 16, 32]
    same = [i for i in range(len(ref)) if i not in differ]
    assert [pyramid.channels(i) for i in same] == [ref.channels(i) for i in same]
    if ours == "inception_v4":
        assert (pyramid.channels(1), ref.channels(1)) == (192, 160)


@pytest.mark.parametrize("ours, theirs, differ", TIMM_TWINS)
def test_feature_sizes_agree_with_timm_at_an_odd_size(ours, theirs, differ):
    x = torch.randn(1, 3, ODD_SIZE, ODD_SIZE)
    model = fz.create_model(ours, features_only=True).eval()
    with torch.no_grad():
        got = [tuple(o.shape[1:]) for o in model(x)]
        want = [tuple(o.shape[1:]) for o in _timm(theirs, meta=False)(x)]
    same = [i for i in range(len(want)) if i not in differ]
    assert [got[i] for i in same] == [want[i] for i in same]
    if ours == "inception_v4":
        assert (got[1], want[1]) == ((192, 21, 21), (160, 23, 23))


@pytest.mark.parametrize("name", FAMILY)
def test_every_entry_is_one_per_reduction(name):
    info = fz.get_feature_info(name)
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert fz.get_feature_info(name, out_indices="pyramid") == info


@pytest.mark.parametrize("name", FAMILY)
def test_truncated_models_compute_less_and_give_the_same_features(name):
    size = SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size)
    full = _randomize_bn(fz.create_model(name)).eval()
    state = full.state_dict()
    every = _features(name, state, None)
    with torch.no_grad():
        ref = every(x)
        # The classifier's forward_features is the same code path: its map is the last feature.
        torch.testing.assert_close(full.forward_features(x), ref[-1], rtol=0, atol=0)
        torch.testing.assert_close(full.forward_head(ref[-1]), full(x), rtol=0, atol=0)
    flops = []
    for i in range(len(ref)):
        single = _features(name, state, [i])
        with torch.no_grad():
            torch.testing.assert_close(single(x)[0], ref[i], rtol=0, atol=0)
        flops.append(_flops(single, x))
    # Nothing past the deepest requested feature runs: each cut costs strictly more than the one before,
    # and the deepest costs what the all-indices model costs.
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] == _flops(every, x)
    # Selections in any order come out in that order, from one pass.
    picked = _features(name, state, [3, 0, 1])
    with torch.no_grad():
        outs = picked(x)
    for out, i in zip(outs, [3, 0, 1]):
        torch.testing.assert_close(out, ref[i], rtol=0, atol=0)
    assert _flops(picked, x) == flops[3]


@pytest.mark.parametrize("name", FAMILY)
def test_first_feature_holds_only_the_stem(name):
    with torch.device("meta"):
        full = fz.create_model(name)
        first = fz.create_model(name, features_only=True, out_indices=[0])
    # The stride-2 stem is a few convs: nothing after it is held.
    n_first = sum(p.numel() for p in first.parameters())
    assert 0 < n_first < 0.01 * sum(p.numel() for p in full.parameters())


def test_inception_v3_aux_head_is_training_only_and_absent_from_features():
    model = fz.create_model("inception_v3", num_classes=10).train()
    assert isinstance(model.aux, nn.Module)
    logits, aux = model(torch.randn(2, 3, 299, 299))
    assert logits.shape == aux.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 10)  # eval: no aux, any size >= 75
    for out_indices in (None, [3]):
        feat = fz.create_model("inception_v3", features_only=True, out_indices=out_indices)
        assert not any(k.startswith("aux.") for k in feat.state_dict())
    # The checkpoint still names the aux head: a feature model loads a full state dict, ignoring it.
    with torch.device("meta"):
        assert any(k.startswith("aux.") for k in fz.create_model("inception_v3").state_dict())


def test_googlenet_aux_heads_are_opt_in_training_only_and_absent_from_features():
    with torch.device("meta"):
        assert not hasattr(fz.create_model("googlenet"), "aux1")  # MindCV's default: no aux heads
    model = fz.create_model("googlenet", aux_logits=True, num_classes=10).train()
    logits, aux2, aux1 = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == aux1.shape == aux2.shape == (2, 10)
    feat = fz.create_model("googlenet", aux_logits=True, features_only=True)
    assert not any(k.startswith(("aux1.", "aux2.")) for k in feat.state_dict())
    assert isinstance(feat, SequentialFeatures)  # a chain of top-level modules: no forward code of its own


@pytest.mark.parametrize("name", ["inception_v3", "inception_v4"])
def test_inception_minimum_input_size(name):
    # Unpadded stride-2 layers: 75 px is the smallest input that reaches stride 32 (hence the larger
    # parity size in tests/zoo.py, and why the contract's 64 px cannot run).
    model = fz.create_model(name, features_only=True, out_indices=[-1]).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75))[0].shape[-2:] == (1, 1)
        with pytest.raises(ValueError, match="input 74x74 px is too small; the smallest it takes is 75x75 px"):
            model(torch.randn(1, 3, 74, 74))


@pytest.mark.parametrize("name", ["dpn92", "dpn131"])
def test_dpn_stage_features_are_the_concatenated_paths(name):
    # The residual path keeps the stage width (256 * 2**s); the dense path grows by inc per block.
    info = fz.get_feature_info(name)
    with torch.device("meta"):
        model = fz.create_model(name)
    for i in (1, 2, 3):
        last = model.get_submodule(info.module_name(i))
        first = model.get_submodule(info.module_name(i).rsplit("_", 1)[0] + "_1")
        blocks = int(info.module_name(i).rsplit("_", 1)[1])
        res = last.layers.conv3_r.out_channels
        inc = last.layers.conv3_d.out_channels
        assert res == 256 * 2 ** (i - 1)
        assert info.channels(i) == res + first.c1x1_w_d.out_channels + blocks * inc


@pytest.mark.parametrize("name, kwargs", [(n, dict(aux_logits=True) if n == "googlenet" else {}) for n in FAMILY])
def test_cfg_names_the_first_conv_and_every_head(name, kwargs):
    with torch.device("meta"):
        model = fz.create_model(name, num_classes=7, **kwargs)
    cfg = model.default_cfg
    first = model.get_submodule(cfg.first_conv)
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    heads = [model.get_submodule(h) for h in cfg.classifier_names]
    # Every module that outputs class scores lies under a named head (aux heads included).
    scorers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 7]
    assert scorers and all(any(s == h or s.startswith(h + ".") for h in cfg.classifier_names) for s in scorers)
    assert all(isinstance(h, nn.Module) for h in heads)


def test_inception_v3_checkpoint_loads_into_another_num_classes():
    # The aux head's linear layer is sized by num_classes too: naming it a head lets a 1000-class
    # checkpoint fill everything else.
    with torch.device("meta"):
        state = {k: torch.zeros_like(v, device="cpu") for k, v in fz.create_model("inception_v3").state_dict().items()}
    model = fz.create_model("inception_v3", num_classes=10)
    report = fz.load_checkpoint(model, state)
    assert sorted(report.skipped_head) == ["aux.fc.bias", "aux.fc.weight", "classifier.bias", "classifier.weight"]
    assert not report.missing and not report.unexpected
