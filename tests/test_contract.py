"""Contract tests over every built-in model: metadata is checked against reality."""
import math

import pytest
import torch

import featurezoo as fz
from featurezoo.registry import model_module
from tests.reference import load_meta
from tests.zoo import HUGE_MODELS, META_ONLY_PARAMS, VALID_PADDED_SIZES, ref_args, skip_init, zoo_models

MODELS = zoo_models()
# One square size and one odd, non-square one: reductions must round up like the convs do, per side.
SIZES = ((64, 64), (67, 83))


def _num_params(model, trainable_only=True):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_huge_model_list_is_complete():
    with torch.device("meta"), skip_init():
        counts = {n: _num_params(fz.create_model(n)) for n in MODELS}
    assert {n for n, c in counts.items() if c > META_ONLY_PARAMS} == HUGE_MODELS


def _feature_shapes(model, size, device):
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        return [tuple(o.shape) for o in model(torch.randn(1, 3, h, w, device=device))]


@pytest.mark.parametrize("name", MODELS)
def test_feature_shapes_match_feature_info(name):
    device = "meta" if name in HUGE_MODELS else "cpu"
    with torch.device(device), skip_init():  # shapes only: the kernels run, the weights' values do not matter
        model = fz.create_model(name, features_only=True).eval()
    info = model.feature_info
    assert len(info) > 0
    cfg = fz.get_model_cfg(name)
    if cfg.valid_padding:
        small, large = VALID_PADDED_SIZES
        for a, b, entry in zip(_feature_shapes(model, small, device), _feature_shapes(model, large, device), info):
            r = entry["reduction"]
            assert a[1] == b[1] == entry["chs"], f"{name} {entry['name']} channels"
            assert b[2] - a[2] == b[3] - a[3] == (large - small) // r, f"{name} {entry['name']}: stride is not {r}"
            assert a[2] <= math.ceil(small / r), f"{name} {entry['name']} larger than ceil(size / reduction)"
        return
    for size in cfg.input_sides or SIZES:
        h, w = (size, size) if isinstance(size, int) else size
        shapes = _feature_shapes(model, size, device)
        assert len(shapes) == len(info)
        for shape, entry in zip(shapes, info):
            r = entry["reduction"]
            if "grid" in entry:  # a fixed token grid (CrossViT resizes its input): the same maps at every size
                expected = (1, entry["chs"], *entry["grid"])
                assert r == round(cfg.input_size[-1] / entry["grid"][-1]), f"{name}: reduction at the native size"
            else:
                expected = (1, entry["chs"], math.ceil(h / r), math.ceil(w / r))
            assert shape == expected, f"{name} {entry['name']} at {h}x{w}px"


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_equals_mindcv(name):
    with torch.device("meta"), skip_init():
        model = fz.create_model(name)
    assert _num_params(model) == load_meta(name, **ref_args(name))["trainable_params"]


@pytest.mark.parametrize("name", MODELS)
def test_feature_info_readable_without_weights(name):
    with torch.device("meta"), skip_init():
        full = fz.create_model(name)
    info = fz.get_feature_info(name)
    assert info == full.feature_info
    assert all(p.is_meta for p in full.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_truncation_and_state_dict_keys(name):
    with torch.device("meta"), skip_init():
        full = fz.create_model(name)
        first = fz.create_model(name, features_only=True, out_indices=[0])
        every = fz.create_model(name, features_only=True)
    full_keys = set(full.state_dict())
    # Kept modules keep the full model's names; nothing new appears.
    assert set(first.state_dict()) <= set(every.state_dict()) < full_keys
    # Asking only for the first level holds strictly fewer parameters.
    assert _num_params(first, False) < _num_params(every, False) < _num_params(full, False)
    heads = full.default_cfg.classifier_names
    assert not any(k.startswith(tuple(h + "." for h in heads)) for k in every.state_dict())


OUTPUT_STRIDE_MODELS = [n for n in MODELS if fz.get_model_cfg(n).output_strides]


def test_output_stride_families():
    """The families that dilate (issue 12): ResNet-like, ResNeSt, SE/SK/Res2Net, BiT, RegNet, MobileNets,
    EfficientNet, ConvNeXt, MnasNet, GhostNet, MixNet, ReXNet."""
    assert {model_module(n) for n in OUTPUT_STRIDE_MODELS} == {
        "resnet", "resnest", "senet", "sknet", "res2net", "bit", "resnetv2", "regnet", "mobilenetv1",
        "mobilenetv2", "mobilenetv3", "efficientnet", "convnext", "mnasnet", "ghostnet", "mixnet", "rexnet"}


@pytest.mark.parametrize("name", OUTPUT_STRIDE_MODELS)
def test_output_stride_shapes(name):
    device = "meta"  # shapes only: the numbers are checked against timm in tests/test_output_stride_*.py
    for output_stride, size in ((16, 64), (8, (67, 83))):
        with torch.device(device), skip_init():
            model = fz.create_model(name, features_only=True, output_stride=output_stride).eval()
        info = model.feature_info
        assert max(info.reduction()) == output_stride
        assert info.reduction() == [min(r, output_stride) for r in fz.get_feature_info(name).reduction()]
        h, w = (size, size) if isinstance(size, int) else size
        for shape, entry in zip(_feature_shapes(model, size, device), info):
            r = entry["reduction"]
            assert shape == (1, entry["chs"], math.ceil(h / r), math.ceil(w / r)), f"{name} os{output_stride}"


@pytest.mark.parametrize("name", [n for n in MODELS if not fz.get_model_cfg(n).output_strides])
def test_output_stride_refused_where_the_family_cannot(name):
    with pytest.raises(ValueError, match=f"{name} does not support output_stride=16.*Families that support "
                                         f"output_stride: .*resnet"):
        fz.build_on_meta(name, features_only=True, output_stride=16)
