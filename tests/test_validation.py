"""What a user who gets something wrong gets: a ValueError naming the culprit and what is valid,
raised before torch sees the mistake, with nothing changed. One test per row of the README's
"What happens when..." table (classes 1-4 of issue 15; the property tests in
tests/test_properties.py draw many more cases of each class)."""
import pytest
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.checkpoint import CheckpointError
from featurezoo.features import FeatureExtractWrapper

# -- 1. builder arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=-1), r"in_channels=-1 is not valid; use an int >= 1"),
    (dict(in_channels=2.5), r"in_channels=2.5 is not valid"),
    (dict(num_classes=-5, features_only=True), r"num_classes=-5 is not valid; use an int >= 0"),
    (dict(num_classes=True), r"num_classes=True is not valid"),
    (dict(features_only="yes"), r"features_only must be True or False, got 'yes'"),
    (dict(drop_rate=1.5), r"drop_rate=1.5 is not valid; use a number in \[0, 1\)"),
    (dict(out_indice=[1, 2]), r"unknown keyword argument\(s\) \['out_indice'\] \(did you mean 'out_indice' -> "
                              r"'out_indices'\?\); valid keywords: .*in_channels.*num_classes"),
    (dict(layers=(1, 1, 1, 1)), r"layers=\(1, 1, 1, 1\) cannot be given; its builder sets layers itself"),
    (dict(checkpoint_path=5), r"checkpoint_path=5 is not valid"),
])
def test_builder_arguments_are_refused_before_torch_sees_them(kwargs, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        fz.create_model("resnet18", **kwargs)


@pytest.mark.parametrize("name, match", [
    (None, r"a model name must be a str, got NoneType"),
    (3, r"a model name must be a str, got int"),
    ("resnet_50", r"Unknown model 'resnet_50'; did you mean resnet50"),
])
def test_a_model_name_that_is_no_name_is_a_value_error(name, match):
    with pytest.raises(ValueError, match=match):
        fz.create_model(name)


def test_a_user_builder_without_kwargs_gets_its_keywords_listed():
    @fz.register_model
    def fz_validation_tiny(pretrained=False, num_classes=10, in_channels=3):
        return nn.Conv2d(in_channels, num_classes, 1)

    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['depth'\]; valid keywords: in_channels, "
                                         r"num_classes, pretrained"):
        fz.create_model("fz_validation_tiny", depth=3)
    assert fz.create_model("fz_validation_tiny", num_classes=4).out_channels == 4


# -- 2. state dicts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squeezenet():
    # A family of two small models: a shape or name error also looks for a family member that fits.
    torch.manual_seed(0)
    return fz.create_model("squeezenet1_0")


def _state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


KEY = "features.7.expand1x1.weight"


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.update({KEY: torch.empty_like(sd[KEY], device="meta")}), rf"'{KEY}' is a meta-device tensor"),
    (lambda sd: sd.update({KEY: sd[KEY].to_sparse()}), rf"'{KEY}' is a torch.sparse_coo tensor"),
    (lambda sd: sd.update({KEY: torch.quantize_per_tensor(sd[KEY], 0.1, 0, torch.qint8)}),
     rf"'{KEY}' is a quantized \(torch.qint8\) tensor"),
    (lambda sd: sd.update({KEY: sd[KEY] > 0}), rf"{KEY}: checkpoint torch.bool into model torch.float32"),
    (lambda sd: sd.update({KEY: sd[KEY].long()}), rf"{KEY}: checkpoint torch.int64 into model torch.float32"),
    (lambda sd: sd.update({7: sd[KEY]}), r"key 7 is of type int, not a str"),
    (lambda sd: sd.update({KEY: sd[KEY][:1]}), rf"{KEY}: checkpoint \[1, 32, 1, 1\] vs model \[128, 32, 1, 1\]"),
    (lambda sd: sd.pop(KEY), rf"1 missing \['{KEY}'\]"),
])
def test_a_bad_state_dict_is_refused_before_any_tensor_is_copied(squeezenet, mutate, match):
    checkpoint = {k: torch.randn_like(v) for k, v in _state_of(squeezenet).items()}
    mutate(checkpoint)
    before = _state_of(squeezenet)
    with pytest.raises(CheckpointError, match=match):
        fz.load_checkpoint(squeezenet, checkpoint)
    after = squeezenet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_fractional_step_counter_is_refused_and_a_whole_one_loads():
    with torch.device("meta"):
        model = fz.create_model("resnet18")
    model = model.to_empty(device="cpu")
    checkpoint = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    checkpoint["bn1.num_batches_tracked"] = torch.tensor(0.5)
    with pytest.raises(CheckpointError, match=r"bn1.num_batches_tracked: checkpoint torch.float32 into model "
                                             r"torch.int64"):
        fz.load_checkpoint(model, checkpoint)
    checkpoint["bn1.num_batches_tracked"] = torch.tensor(7.0)
    fz.load_checkpoint(model, checkpoint)
    assert model.bn1.num_batches_tracked.item() == 7 and model.bn1.num_batches_tracked.dtype == torch.int64


# -- 3. user feature_info ------------------------------------------------------------------------


class Net(nn.Module):
    """A three-stage user model; ``mode`` makes its forward something the sequential strategy cannot serve."""

    def __init__(self, info, mode=""):
        super().__init__()
        self.mode = mode
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.s1 = nn.Conv2d(8, 8, 3, 2, 1)
        self.s2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.head = nn.Linear(16, 10)
        self.feature_info = info

    def forward(self, x):
        x = self.stem(x)
        if self.mode == "twice":
            x = self.s1(x)
        if self.mode == "between":
            x = x * 2
        x = self.s1(x)
        if self.mode == "skip_s2":
            return x
        return self.head(self.s2(x).mean((2, 3)))


GOOD = [dict(chs=8, reduction=2, name="stem"), dict(chs=8, reduction=4, name="s1"),
        dict(chs=16, reduction=8, name="s2")]


def _with(i, **change):
    return [dict(e, **change) if j == i else e for j, e in enumerate(GOOD)]


@pytest.mark.parametrize("info, mode, match", [
    (_with(2, name="s1"), "", r"feature_info\[2\]\['name'\] = 's1' is also entry 1's module"),
    (_with(2, chs=32), "", r"feature_info\[2\] \('s2'\) declares chs=32, but the module outputs 16 channels"),
    (_with(1, reduction=8), "", r"feature_info\[1\] \('s1'\) declares reduction=8, but its maps are \(16, 16\) "
                                r"at 64 px and \(18, 18\) at 72 px \(a stride of 4/4\)"),
    (GOOD, "twice", r"its forward calls 's1' more than once"),
    (GOOD, "between", r"does not feed the output of the module before 's1' straight into 's1'"),
    (GOOD, "skip_s2", r"its forward never calls \['s2'\]"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_declared_feature_info_is_checked_against_a_forward(info, mode, match, device):
    with torch.device(device):
        model = Net(info, mode)
    with pytest.raises(ValueError, match=match):
        FeatureExtractWrapper(model)


def test_a_correct_user_model_wraps_and_runs_and_the_check_leaves_it_as_it_was():
    model = Net(GOOD, mode="ok").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feat = FeatureExtractWrapper(model, out_indices=[2, 0])
    assert all(torch.equal(feat.state_dict()[k], v) for k, v in before.items() if not k.startswith("head."))
    assert not any(p.is_meta for p in feat.parameters())
    assert feat.training and model.stem.training  # the probe ran in eval mode and put the flags back
    assert [tuple(o.shape) for o in feat(torch.randn(2, 3, 32, 32))] == [(2, 16, 4, 4), (2, 8, 16, 16)]


class Rewritten(Net):
    is_rewritten = True

    def forward_features(self, x):
        return self.s2(self.s1(self.stem(x)))  # one tensor, not one per entry


def test_a_rewritten_forward_features_returning_one_tensor_is_refused_at_wrap_time():
    with pytest.raises(ValueError, match=r"forward_features returned a Tensor but feature_info has 3 entries"):
        FeatureExtractWrapper(Rewritten(GOOD))


# -- 4. inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, side, match", [
    ("nasnet_a_4x1056", 131, r"131x131 px is not a size it takes: sides s with s % 16 in "
                             r"\[0, 1, 2, 11, 12, 13, 14, 15\].*valid sides near it: \[129, 130, 139, 140\]"),
    ("halonet_50t", 224, r"224x224 px is not a size it takes.*\[249, 250\]"),
    ("repmlp_t224", 230, r"230x230 px is not a size it takes.*\[226, 227, 448, 449\]"),
    ("inception_v3", 64, r"input 64x64 px is too small; the smallest it takes is 75x75 px"),
])
def test_sizes_a_model_declares_invalid_are_refused_naming_valid_ones(name, side, match):
    x = torch.empty(1, 3, side, side, device="meta")
    for features_only in (True, False):
        model = fz.build_on_meta(name, features_only=features_only)
        with pytest.raises(ValueError, match=match):
            model(x)


def test_levels_before_the_layer_a_rule_protects_run_at_any_size():
    # NASNet's rule is for its stride-16 cell; the stride-2..8 levels run at 131 px.
    shallow = fz.build_on_meta("nasnet_a_4x1056", features_only=True, out_indices=[0, 1, 2])
    assert [tuple(o.shape) for o in shallow(torch.empty(1, 3, 131, 131, device="meta"))] == [
        (1, 32, 65, 65), (1, 44, 33, 33), (1, 264, 17, 17)]


@pytest.mark.parametrize("x, match", [
    (torch.zeros(3, 32, 32), r"must be \(N, 3, H, W\) with H, W >= 1, got shape \(3, 32, 32\) \(add the batch"),
    (torch.zeros(1, 4, 32, 32), r"must be \(N, 3, H, W\)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"must be a floating tensor \(torch.float32\), got torch.uint8"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.float64), r"the input is torch.float64 but the weights are torch.float32"),
])
def test_an_input_of_the_wrong_kind_is_refused(x, match):
    feat = FeatureExtractWrapper(Net(GOOD))
    with pytest.raises(ValueError, match=match):
        feat(x)
