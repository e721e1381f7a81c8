"""output_stride 16 and 8 in the ResNet-like families (ResNet/ResNeXt, SE-ResNet/SENet, SKNet, Res2Net,
ResNeSt, BiT, ResNetV2): the last stages trade stride for dilation on timm's schedule.

Where the family declares a timm twin, ours given the twin's weights computes the twin's dilated features;
elsewhere the contract is checked directly: sizes at two inputs, the classifier's parameters, levels before
the first dilated stage bit-identical to the undilated model's, and dilated convolutions where they belong.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import AvgPool2dSame
from timm.layers import StdConv2d as TimmStdConv2d

import featurezoo as fz
from featurezoo.layers.padding import AvgPool2d
from featurezoo.models.bit import StdConv2d
from featurezoo.models.resnet import stage_dilations
from featurezoo.models.senet import SEBottleneck, SENet

RTOL = 1e-4  # of the largest |timm| value; in float64 the agreement is ~1e-12

# (name, input size, output stride). Sizes: ResNet's and SKNet's stem max pool is MindSpore "same", timm's
# pads one on each side, the same windows only where the stem output is odd (65 px); Res2Net and BiT pad
# symmetrically everywhere. Res2Net's two stems are compared at one stride each: their stages are the same
# code but for v1b's shortcut pool, whose dilated form only stride 8 gives in layer3 and layer4.
TWINS = [("resnet18", 65, 16), ("resnet18", 65, 8), ("skresnet18", 65, 16), ("skresnet18", 65, 8),
         ("res2net50", 64, 16), ("res2net50_v1b", 64, 8), ("BiT_resnet50", 64, 16), ("BiT_resnet50", 64, 8)]


def _randomise(model: nn.Module) -> nn.Module:
    """Random weights and norm statistics: timm zero-inits the last norm of each residual branch."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.2, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _swap_timm_differences(model: nn.Module) -> None:
    """Make timm compute what ours does where the two differ by design:
    - Res2Net-v1b's dilated shortcut pool: timm's AvgPool2dSame zero-pads the bottom/right row and counts it
      in the average, ours (MindSpore "same", as its own stride-2 pool and timm's ceil-mode one) does not;
    - BiT's weight standardisation eps: MindCV 1e-10, timm 1e-8 (tests/test_resnet_variants.py)."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, AvgPool2dSame):
                setattr(parent, child_name, AvgPool2d(child.kernel_size[0], child.stride[0], pad_mode="same"))
            elif isinstance(child, TimmStdConv2d):
                child.eps = StdConv2d.eps


@pytest.mark.parametrize("name, size, output_stride", TWINS, ids=[f"{t[0]}-{t[2]}" for t in TWINS])
def test_dilated_features_equal_the_timm_twins(name, size, output_stride):
    theirs = _randomise(timm.create_model(fz.get_model_cfg(name).timm_twin, output_stride=output_stride))
    _swap_timm_differences(theirs)
    ours = _uninitialised(name, output_stride=output_stride).eval()
    report = fz.load_checkpoint(ours, theirs.state_dict())  # timm's names, converted by the family's rules
    assert not report.missing
    ours.double()
    theirs.double()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        feats = ours(x)
        expected = theirs.forward_intermediates(x, norm=True, intermediates_only=True)
    assert ours.feature_info.reduction() == [e["reduction"] for e in theirs.feature_info]
    assert max(ours.feature_info.reduction()) == output_stride
    assert len(feats) == len(expected)
    for i, (a, b) in enumerate(zip(feats, expected)):
        assert a.shape == b.shape, f"{name} level {i}: {tuple(a.shape)} vs timm {tuple(b.shape)}"
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= RTOL * scale, f"{name} level {i}: max abs diff {err:.3g} > {RTOL} x {scale:.3g}"


def _senet154_layout(**kwargs) -> SENet:
    """SENet-154's blocks, stem and 3x3 shortcuts at one block per stage (the real one is 115M parameters)."""
    return SENet(SEBottleneck, (1, 1, 1, 1), group=64, reduction=16, downsample_kernel_size=3,
                 downsample_padding=1, inplanes=128, input3x3=True, **kwargs)


# SE-ResNeXt's block is SENet-154's (_SEBottleneckBase) at other widths; skresnet50: SKNet's bottleneck.
NO_TWIN = ["seresnet18", "senet154", "skresnet50", "resnetv2_50", "resnest14"]


def _build(name: str, **kwargs) -> nn.Module:
    if name == "senet154":
        return fz.FeatureExtractWrapper(_senet154_layout(**kwargs), model_name=name)
    return fz.create_model(name, features_only=True, **kwargs)


def _uninitialised(name: str, **kwargs) -> nn.Module:
    """The feature model with uninitialised memory (weight init is most of the cost here): to be loaded."""
    with torch.device("meta"):
        model = _build(name, **kwargs)
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("name", NO_TWIN)
def test_dilated_contract(name):
    plain = _randomise(_build(name))
    sizes = ((64, 64), (67, 83))
    inputs = [torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in sizes]
    with torch.no_grad():
        refs = [plain(x) for x in inputs]
    for output_stride in (16, 8):
        _check_dilated(name, plain, _uninitialised(name, output_stride=output_stride).eval(), output_stride, inputs,
                       refs)


def _check_dilated(name, plain, dilated, output_stride, inputs, refs):
    dilated.load_state_dict(plain.state_dict())  # strict: the classifier's parameters, names and shapes
    plain_red, red = plain.feature_info.reduction(), dilated.feature_info.reduction()
    assert red == [min(r, output_stride) for r in plain_red] and max(red) == output_stride
    # Stages are still counted as the undilated model's (frozen_stages) although two share a stride.
    assert [e.get("stage") for e in dilated.feature_info][1:] == [1, 2, 3, 4]

    for x, ref in zip(inputs, refs):
        h, w = x.shape[-2:]
        with torch.no_grad():
            outs = dilated(x)
        for e, o in zip(dilated.feature_info, outs):
            assert tuple(o.shape) == (1, e["chs"], math.ceil(h / e["reduction"]), math.ceil(w / e["reduction"]))
        for i, (a, b) in enumerate(zip(ref, outs)):
            if plain_red[i] == red[i]:  # before the first dilated stage: the same computation
                assert torch.equal(a, b), f"{name} level {i} differs before the first dilated stage"

    # Dilation, not just a dropped stride: a dilated stage's 3x3 convs reach as far as the stride given up
    # (its first block as far as the previous stage's; SKNet's second path twice as far).
    for i, (_, first_dilation, dilation) in enumerate(stage_dilations(output_stride, 4)):
        stage = dilated.get_submodule(f"layer{i + 1}")
        found = {m.dilation[0] for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1}
        expected = {first_dilation, dilation} if len(stage) > 1 else {first_dilation}
        assert expected <= found, f"{name} layer{i + 1}: dilations {found}, expected {expected}"


def test_schedule_is_timms():
    assert stage_dilations(32, 4) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1)]
    assert stage_dilations(16, 4) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]
    assert stage_dilations(8, 4) == [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
    with pytest.raises(ValueError, match="output_stride"):
        stage_dilations(12, 4)


def test_senet154_shortcut_keeps_its_kernel_dilated_as_timm():
    # timm's downsample_conv: a k>1 shortcut conv in a dilated stage keeps k, dilated like the block's first conv.
    model = _senet154_layout(output_stride=8)
    convs = [model.get_submodule(f"layer{i}.0.downsample.0") for i in (2, 3, 4)]
    assert [(c.kernel_size[0], c.stride[0], c.dilation[0], c.padding[0]) for c in convs] == [
        (3, 2, 1, 1), (3, 1, 1, 1), (3, 1, 2, 2)]


def test_resnest_output_stride_is_mindcvs_dilation_setting():
    for output_stride, mindcv in ((16, dict(dilation=2)), (8, dict(dilated=True))):
        with torch.device("meta"):
            a = fz.create_model("resnest14", output_stride=output_stride)
            b = fz.create_model("resnest14", **mindcv)
        assert a.feature_info == b.feature_info
        assert repr(a) == repr(b)  # every conv's stride, dilation and padding, every pool
    with pytest.raises(ValueError, match="contradicts"):
        fz.create_model("resnest14", output_stride=16, dilated=True)


def test_frozen_stages_count_stages_when_strides_repeat():
    model = fz.create_model("resnet18", features_only=True, output_stride=8, frozen_stages=3)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2", "layer3"} and trainable == {"layer4"}
