"""The feature contract on user-defined models: the guide's three scenarios,
validation, ordering, truncation and name preservation."""
import math

import pytest
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo import FeatureExtractWrapper, build_model_with_cfg, register_model


class Layer(nn.Sequential):
    def __init__(self, cin, cout, stride=2):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Head(nn.Module):
    def __init__(self, chs, num_classes):
        super().__init__()
        self.classifier = nn.Linear(chs, num_classes)

    def forward(self, x):
        return self.classifier(x.mean((2, 3)))


# Scenario 1: a separate module per layer, registered in __init__.
class DummyNet1(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.feature_info = []
        chs, red = in_channels, 1
        for i, out in enumerate((8, 16, 32, 64)):
            setattr(self, f"layer{i + 1}", Layer(chs, out))
            chs, red = out, red * 2
            self.feature_info.append(dict(chs=chs, reduction=red, name=f"layer{i + 1}"))
        self.head = Head(chs, num_classes)

    def forward_features(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.head(self.forward_features(x))


# Scenario 2: one sequential module for all layers, flatten_sequential.
class DummyNet2(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.feature_info = []
        self.flatten_sequential = True
        layers, chs, red = [], in_channels, 1
        for i, out in enumerate((8, 16, 32, 64)):
            layers.append(Layer(chs, out))
            chs, red = out, red * 2
            self.feature_info.append(dict(chs=chs, reduction=red, name=f"layers.{i}"))
        self.layers = nn.Sequential(*layers)
        self.head = Head(chs, num_classes)

    def forward(self, x):
        return self.head(self.layers(x))


# Scenario 3: parallel branches; a rewritten subclass returns every feature.
class DummyNet3(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.layer1 = nn.ModuleList([nn.Conv2d(in_channels, 8, 3, 2, 1) for _ in range(3)])
        self.stage1 = nn.BatchNorm2d(8)
        self.layer2 = nn.ModuleList([nn.Conv2d(8, 16, 3, 2, 1) for _ in range(3)])
        self.stage2 = nn.BatchNorm2d(16)
        self.classifier = nn.Linear(16, num_classes)

    def _stage(self, x, branches, merge):
        return merge(sum(b(x) for b in branches))

    def forward_features(self, x):
        return self._stage(self._stage(x, self.layer1, self.stage1), self.layer2, self.stage2)

    def forward(self, x):
        return self.classifier(self.forward_features(x).mean((2, 3)))


class DummyFeatureNet3(DummyNet3):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.feature_info = [dict(chs=8, reduction=2, name="stage1"), dict(chs=16, reduction=4, name="stage2")]
        self.is_rewritten = True

    def forward_features(self, x):
        x1 = self._stage(x, self.layer1, self.stage1)
        return [x1, self._stage(x1, self.layer2, self.stage2)]


def _create_dummynet(cls, pretrained=False, **kwargs):
    return build_model_with_cfg(cls, pretrained, **kwargs)


@register_model
def dummynet1(pretrained: bool = False, num_classes: int = 10, in_channels=3, **kwargs):
    model_args = dict(num_classes=num_classes, in_channels=in_channels, **kwargs)
    return _create_dummynet(DummyNet1, pretrained, **dict(default_cfg={"url": "", "classifier": "head"}, **model_args))


@register_model
def dummynet2(pretrained: bool = False, num_classes: int = 10, in_channels=3, **kwargs):
    model_args = dict(num_classes=num_classes, in_channels=in_channels, **kwargs)
    return _create_dummynet(DummyNet2, pretrained, **dict(default_cfg={"url": "", "classifier": "head"}, **model_args))


@register_model
def dummynet3(pretrained: bool = False, num_classes: int = 10, in_channels=3, **kwargs):
    # As the guide: the feature class is chosen on features_only.
    cls = DummyFeatureNet3 if kwargs.get("features_only", False) else DummyNet3
    model_args = dict(num_classes=num_classes, in_channels=in_channels, **kwargs)
    return _create_dummynet(cls, pretrained, **dict(default_cfg={"url": "", "classifier": "classifier"}, **model_args))


X = torch.randn(2, 3, 32, 32)


def _hooked_outputs(model, names, x):
    """Ground truth by forward hooks on the untouched classifier."""
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in names]
    model(x)
    for h in hooks:
        h.remove()
    return [got[n] for n in names]


@pytest.mark.parametrize("name", ["dummynet1", "dummynet2"])
def test_sequential_scenarios_match_the_classifier(name):
    full = fz.create_model(name).eval()
    feat = fz.create_model(name, features_only=True, out_indices=[0, 1, 2, 3]).eval()
    feat.load_state_dict(full.state_dict(), strict=False)
    names = full.feature_info
    expected = _hooked_outputs(full, [e["name"] for e in names], X)
    got = feat(X)
    assert len(got) == 4
    for g, e, info in zip(got, expected, names):
        assert g.shape[1] == info["chs"] and g.shape[-1] == math.ceil(32 / info["reduction"])
        torch.testing.assert_close(g, e)


def test_rewritten_scenario():
    full = fz.create_model("dummynet3").eval()
    feat = fz.create_model("dummynet3", features_only=True, out_indices=[1, 0]).eval()
    report = fz.load_checkpoint(feat, full.state_dict())
    assert report.skipped_head == ["classifier.bias", "classifier.weight"] or set(report.skipped_head) == {
        "classifier.weight", "classifier.bias"}
    assert not hasattr(feat, "classifier")
    s1 = full.stage1(sum(b(X) for b in full.layer1))
    s2 = full.stage2(sum(b(s1) for b in full.layer2))
    out = feat(X)
    torch.testing.assert_close(out[0], s2)
    torch.testing.assert_close(out[1], s1)
    assert feat.out_channels == [16, 8]


def test_outputs_follow_requested_order_and_negative_indices():
    full = fz.create_model("dummynet1").eval()
    feat = fz.create_model("dummynet1", features_only=True, out_indices=[-1, 1]).eval()
    feat.load_state_dict(full.state_dict(), strict=False)
    assert feat.out_indices == [3, 1]
    assert feat.out_channels == [64, 16] == feat.feature_info.channels()
    assert feat.feature_info.reduction() == [16, 4]
    assert feat.feature_info.module_name() == ["layer4", "layer2"]
    l2, l4 = _hooked_outputs(full, ["layer2", "layer4"], X)
    out = feat(X)
    torch.testing.assert_close(out[0], l4)
    torch.testing.assert_close(out[1], l2)


def test_none_means_all_and_pyramid_keeps_last_per_reduction():
    assert fz.create_model("dummynet2", features_only=True).out_indices == [0, 1, 2, 3]

    class PerBlock(DummyNet2):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.layers = nn.Sequential(*self.layers, Layer(64, 64, stride=1))
            self.feature_info.append(dict(chs=64, reduction=16, name="layers.4"))

    m = build_model_with_cfg(PerBlock, features_only=True, out_indices="pyramid")
    assert m.out_indices == [0, 1, 2, 4]
    assert [o.shape[-1] for o in m(X)] == [16, 8, 4, 2]


def test_layers_after_deepest_feature_and_head_are_removed():
    full = fz.create_model("dummynet2")
    feat = fz.create_model("dummynet2", features_only=True, out_indices=[1])
    kept = dict(feat.named_parameters())
    assert set(kept) < set(dict(full.named_parameters()))
    assert not any(k.startswith(("head.", "layers.2.", "layers.3.")) for k in kept)
    assert len(feat.layers) == 2
    assert sum(p.numel() for p in feat.parameters()) < sum(p.numel() for p in full.parameters())


def test_state_dict_keys_are_the_full_models_keys():
    full = fz.create_model("dummynet2")
    feat = fz.create_model("dummynet2", features_only=True, out_indices=[0, 1, 2, 3])
    head = {k for k in full.state_dict() if k.startswith("head.")}
    assert set(feat.state_dict()) == set(full.state_dict()) - head
    # A classifier checkpoint loads into the feature model with no renaming.
    report = fz.load_checkpoint(feat, full.state_dict())
    assert not report.missing and not report.unexpected and not report.remapped
    for k, v in feat.state_dict().items():
        assert torch.equal(v, full.state_dict()[k])


def test_flattened_checkpoint_needs_auto_mapping():
    full = fz.create_model("dummynet2")
    flat = {k.replace("layers.", "layers_", 1): v for k, v in full.state_dict().items()}
    feat = fz.create_model("dummynet2", features_only=True)
    with pytest.raises(fz.CheckpointError, match="auto_mapping=True"):
        fz.load_checkpoint(feat, flat)
    before = {k: v.clone() for k, v in feat.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in feat.state_dict().items())
    report = fz.load_checkpoint(feat, flat, auto_mapping=True)
    assert ("layers_0.0.weight", "layers.0.0.weight", "flattened name") in report.remapped
    assert torch.equal(feat.state_dict()["layers.3.1.running_var"], full.state_dict()["layers.3.1.running_var"])


def test_train_eval_propagate():
    feat = fz.create_model("dummynet1", features_only=True)
    feat.eval()
    assert not feat.layer1[1].training
    feat.train()
    assert feat.layer1[1].training


@pytest.mark.parametrize("out_indices, match", [
    ([0, 7], r"entry 7 is out of range; 4 entries, valid indices -4\.\.3"),
    ([-5], "out of range"),
    ([1, -3], r"names entry 1 \(layer2\) twice"),
    ([], "empty"),
    (2, "must be a sequence of ints"),
    ([1.0], "entries must be ints"),
    ("pyramids", "not valid"),
])
def test_bad_out_indices_name_the_model_and_list_valid_entries(out_indices, match):
    with pytest.raises(ValueError, match=match) as exc:
        fz.create_model("dummynet1", features_only=True, out_indices=out_indices)
    assert "dummynet1" in str(exc.value)
    if "range" in match or "twice" in match:
        assert "index  name    chs  reduction" in str(exc.value) and "layer4  64   16" in str(exc.value)


def _with_info(info):
    class Bad(DummyNet1):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.feature_info = info
    return Bad


@pytest.mark.parametrize("info, match", [
    ([], "non-empty list"),
    (None, "non-empty list"),
    ([dict(chs=8, name="layer1")], r"lacks key\(s\) \['reduction'\]"),
    ([dict(chs=0, reduction=2, name="layer1")], r"\['chs'\] must be a positive int"),
    ([dict(chs=8, reduction=-2, name="layer1")], r"\['reduction'\] must be a positive int"),
    ([dict(chs=8, reduction=2, name="layer9")], "'layer9' is not a module of the model"),
    ([dict(chs=8, reduction=2, name="layer1", fmt="NLC")], "fmt"),
    (["layer1"], "must be a dict"),
])
def test_bad_feature_info_is_rejected_at_wrap_time(info, match):
    with pytest.raises(ValueError, match=match):
        build_model_with_cfg(_with_info(info), default_cfg={"classifier": "head"}, features_only=True)


def test_model_without_feature_info():
    with pytest.raises(ValueError, match="does not support features_only"):
        build_model_with_cfg(lambda: nn.Conv2d(3, 3, 1), features_only=True)


def test_feature_inside_non_sequential_container_is_refused():
    class Nested(DummyNet1):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.layer1 = nn.ModuleDict({"a": Layer(3, 8)})
            self.feature_info[0]["name"] = "layer1.a"

    with pytest.raises(ValueError, match="only an nn.Sequential can be entered"):
        build_model_with_cfg(Nested, features_only=True)


def test_out_indices_without_features_only():
    with pytest.raises(ValueError, match="without features_only=True"):
        fz.create_model("dummynet1", out_indices=[1])


def test_nhwc_entries_are_returned_nchw():
    class ToNHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 4, 4)
            self.to_nhwc = ToNHWC()
            self.feature_info = [dict(chs=8, reduction=4, name="to_nhwc", fmt="NHWC")]

    (out,) = build_model_with_cfg(Tokens, features_only=True)(X)
    assert out.shape == (2, 8, 8, 8)


def test_default_cfg_dict_with_typo_is_an_error():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['classifer'\]"):
        build_model_with_cfg(DummyNet1, default_cfg={"classifer": "head"})


def test_feature_wrapper_can_be_used_directly():
    m = FeatureExtractWrapper(DummyNet1(), out_indices=[0])
    assert m.out_channels == [8]
    assert "out_indices=[0]" in repr(m)


@pytest.mark.parametrize("name", ["dummynet1", "resnet18", "regnet_x_200mf"])
def test_feature_models_copy_and_pickle(name):
    """deepcopy and pickle re-create the concrete feature class (sequential or levels) with its state."""
    import copy
    import pickle

    model = fz.create_model(name, features_only=True, out_indices=[-1, 0]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone) is type(model) and clone.out_indices == model.out_indices
            for a, b in zip(clone(x), want):
                assert torch.equal(a, b)
