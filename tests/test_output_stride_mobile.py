"""output_stride 16 and 8 in RegNet, MobileNetV1/V2/V3, EfficientNet, ConvNeXt (V1 and V2), MnasNet, GhostNet,
MixNet and ReXNet: the strides past output_stride become dilation, on timm's schedule for the architecture.

Where the family declares a timm twin whose timm class dilates, ours given the twin's weights computes the
twin's dilated features. Every family is also checked directly (smallest variant): sizes at two inputs, the
same parameters as the undilated model, levels before the first dilated stage bit-identical to its levels,
and the a-trous identity: a dilated level read every ``f``-th pixel (``f`` the stride given up) is the
undilated level, which holds only if each removed stride became dilation in every later conv.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.freezing import stage_entries
from featurezoo.layers.squeeze_excite import SqueezeExcite
from featurezoo.models.convnext import GRN, Block
from tests.zoo import zoo_models

RTOL = 1e-4  # of the largest |reference| value; measured: 0 but for ConvNeXt (7e-7) and a-trous (2e-7)

# The smallest variant of each family (mobilenet_v2_035_96 and rexnet_10 have timm twins).
FAMILIES = {"regnet": "regnet_x_200mf", "mobilenetv1": "mobilenet_v1_025", "mobilenetv2": "mobilenet_v2_035_96",
            "mobilenetv3": "mobilenet_v3_small_075", "efficientnet": "efficientnet_b0", "convnext": "convnextv2_atto",
            "mnasnet": "mnasnet_050", "ghostnet": "ghostnet_050", "mixnet": "mixnet_s", "rexnet": "rexnet_10"}

# name -> (our entries at timm's feature_info entries, input side). Sides: EfficientNet pads MindSpore "same",
# timm's efficientnet_b0 symmetrically: the same windows where every strided conv gets an odd input (65 px);
# the others pad symmetrically (ConvNeXt's stride-2 2x2 convs: no padding at even sizes).
TWINS = {
    "regnet_x_200mf": (("stem", "stages.0", "stages.1", "stages.2", "stages.3"), 64),
    "mobilenet_v2_035_96": (("features.3", "features.5", "features.8", "features.15", "features.19"), 64),
    "efficientnet_b0": (("features.3", "features.4", "features.5", "features.7", "features.9"), 65),
    "convnext_tiny": (("feature.1", "feature.3", "feature.5", "feature.7"), 64),
    "rexnet_10": (("features.0", "features.2", "features.4", "features.10", "features.15"), 64),
}
# Families with timm twins whose timm class refuses output_stride: checked directly only.
TIMM_CANNOT_DILATE = {"ghostnet": "timm's GhostNet asserts output_stride == 32"}


def _randomise(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (the initial ones are the identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _uninitialised(name: str, **kwargs) -> nn.Module:
    """The feature model with uninitialised memory (weight init is most of the cost here): to be loaded."""
    with torch.device("meta"):
        model = fz.create_model(name, features_only=True, **kwargs)
    return model.to_empty(device="cpu")


def test_families_declare_output_strides_and_twins_are_compared():
    for module, name in FAMILIES.items():
        names = [n for n in zoo_models() if fz.registry.model_module(n) == module]
        assert name in names
        assert all(fz.get_model_cfg(n).output_strides == (8, 16, 32) for n in names), module
        twinned = [n for n in names if fz.get_model_cfg(n).timm_twin]
        assert not twinned or set(twinned) & set(TWINS) or module in TIMM_CANNOT_DILATE, module


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", list(TWINS))
def test_dilated_features_equal_the_timm_twins(name, output_stride):
    names, size = TWINS[name]
    theirs = _randomise(timm.create_model(fz.get_model_cfg(name).timm_twin, output_stride=output_stride))
    index = [e["name"] for e in fz.get_feature_info(name)]
    ours = _uninitialised(name, output_stride=output_stride, out_indices=[index.index(n) for n in names]).eval()
    report = fz.load_checkpoint(ours, theirs.state_dict())  # timm's names, converted by the family's rules
    assert not report.missing
    for m in ours.modules():
        if isinstance(m, Block):
            m.act = nn.GELU()  # MindCV's ConvNeXt GELU is the tanh approximation, timm's the exact one
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = ours(x)
        expected = theirs.forward_intermediates(x, intermediates_only=True)
    assert ours.feature_info.reduction() == [e["reduction"] for e in theirs.feature_info]
    assert max(ours.feature_info.reduction()) == output_stride
    assert len(feats) == len(expected)
    for i, (a, b) in enumerate(zip(feats, expected)):
        assert a.shape == b.shape, f"{name} level {i}: {tuple(a.shape)} vs timm {tuple(b.shape)}"
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= RTOL * scale, f"{name} level {i}: max abs diff {err:.3g} > {RTOL} x {scale:.3g}"


def _without_global_ops(model: nn.Module) -> nn.Module:
    """Squeeze-excite and GRN pool over the whole map, which the a-trous identity does not cover."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, (SqueezeExcite, GRN)):
                setattr(parent, child_name, nn.Identity())
    return model


def _levels(model: nn.Module, inputs):
    with torch.no_grad():
        return [model(x) for x in inputs]


@pytest.mark.parametrize("name", list(FAMILIES.values()))
def test_dilated_contract(name):
    plain = _randomise(fz.create_model(name, features_only=True))
    plain_info, state = plain.feature_info, plain.state_dict()
    sizes = ((64, 64), (67, 83))
    inputs = [torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in sizes]
    refs = _levels(plain, inputs)
    # Every strided conv sees an odd input at 65 x 97 px, where MindSpore's "same" padding is symmetric, as a
    # stride-1 conv's is: only then does a dilated map sampled every f-th pixel line up with the strided one.
    a_trous_input = [torch.randn(1, 3, 65, 97, generator=torch.Generator().manual_seed(65))]
    a_trous_refs = _levels(_without_global_ops(plain), a_trous_input)
    for output_stride in (16, 8):
        dilated = _uninitialised(name, output_stride=output_stride).eval()
        dilated.load_state_dict(state)  # strict: the same parameters, names and shapes
        info = dilated.feature_info
        assert [e["name"] for e in info] == [e["name"] for e in plain_info]
        assert info.channels() == plain_info.channels()
        assert info.reduction() == [min(r, output_stride) for r in plain_info.reduction()]
        assert max(info.reduction()) == output_stride
        # Stages are still counted as the undilated model's (frozen_stages) although two share a stride.
        assert stage_entries(info.info) == stage_entries(plain_info.info) and len(stage_entries(info.info)) == 4

        for x, ref, outs in zip(inputs, refs, _levels(dilated, inputs)):
            h, w = x.shape[-2:]
            for i, (e, a, b) in enumerate(zip(info, ref, outs)):
                assert tuple(b.shape) == (1, e["chs"], math.ceil(h / e["reduction"]), math.ceil(w / e["reduction"]))
                if e["reduction"] == plain_info[i]["reduction"]:  # before the first dilated stage
                    assert torch.equal(a, b), f"{name} level {i} differs before the first dilated stage"

        _without_global_ops(dilated)
        for ref, outs in zip(a_trous_refs, _levels(dilated, a_trous_input)):
            for i, (e, a, b) in enumerate(zip(info, ref, outs)):
                f = plain_info[i]["reduction"] // e["reduction"]
                if name.startswith("convnext") and output_stride == 8 and e["stage"] == 4:
                    # timm's (so our) dilation-2 2x2 conv pads "same", 1 on each side: its taps sit at -1 and
                    # +1 instead of 0 and +2, half a step off the stride-2 conv's grid.
                    continue
                sub = b[..., ::f, ::f]
                assert sub.shape == a.shape
                err, scale = (sub - a).abs().max().item(), a.abs().max().item()
                assert err <= RTOL * scale, f"{name} os {output_stride} level {i}: {err:.3g} > {RTOL} x {scale:.3g}"
