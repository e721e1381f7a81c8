"""timm weights load into featurezoo models with a timm twin: every tensor lands
where timm had it, and where the computation is identical, so are the outputs."""
import pytest
import timm
import torch

import featurezoo as fz
from featurezoo.checkpoint.timm import convert_from_timm
from tests.zoo import zoo_models

TWINS = [(n, fz.get_model_cfg(n).timm_twin) for n in zoo_models() if fz.get_model_cfg(n).timm_twin]
# Input sizes at which our computation equals timm's exactly (MindSpore 'same' padding
# is symmetric there); families not listed differ numerically at every size.
# mobilenetv2, repvgg, rexnet, res2net, densenet, regnet, inceptionv4: symmetric (or no) padding throughout, so any
# size. resnet, sknet: the stem max pool's input must be odd (65 px). xception: every strided block's max pool input
# must be odd (71 px: 33, 17, 9, 5). efficientnet: every size at which each stride-2 conv gets an odd input
# (1, 33, 65, ...; B5-B7, twinned with TF-padded tf_*, any size); but in the deep randomised B5-B7/V2 nets the
# float32 rounding differences (x * sigmoid(x) vs SiLU) grow block by block to up to ~1 relative at 33 and 65 px
# (in float64: 1e-15 for B0-B4, up to 1e-5 for B7), so the family is compared at 1 px, where every map is 1x1.
# edgenext: maps round the same way at multiples of 32 px.
# Not listed: convnext (MindCV's GELU is the tanh approximation, timm's the exact one), hrnet (MindCV rounds
# upsampled fusion terms to float16), bit (weight standardisation eps 1e-10 vs timm's 1e-8), mnasnet (BN eps
# 1e-3 vs 1e-5), mobilenetv1 (ReLU vs timm's ReLU6), mixnet (squeeze-excite ReLU vs timm's Swish).
IDENTICAL_AT = {"resnet": 65, "mobilenetv2": 65, "repvgg": 65, "rexnet": 65, "efficientnet": 1, "res2net": 65,
                "sknet": 65, "densenet": 65, "inceptionv4": 99, "xception": 71, "regnet": 65, "edgenext": 64}


def _randomised(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("name, twin", TWINS)
def test_every_timm_tensor_lands_where_timm_had_it(name, twin):
    theirs = _randomised(timm.create_model(twin, pretrained=False))
    ours = fz.create_model(name)
    report = fz.load_checkpoint(ours, theirs.state_dict())  # detected as timm
    assert not report.missing and not report.unexpected
    # Converted from timm's names, or timm's names are ours (visformer).
    assert any(rule.startswith("timm") for _, _, rule in report.remapped) or set(theirs.state_dict()) <= set(
        ours.state_dict())
    ours_sd = ours.state_dict()
    # Identity check: each timm tensor is found, bit-exact, under one of our names; one that the
    # family's declared timm_convert splits or reshapes (a fused qkv: MindCV keeps q, k and v apart)
    # must land piece by piece under the names the conversion gives.
    for tname, t in theirs.state_dict().items():
        if tname.endswith("num_batches_tracked"):
            continue
        if any(v.shape == t.shape and torch.equal(v, t) for v in ours_sd.values()):
            continue
        pieces = convert_from_timm(fz.get_model_cfg(name), {tname: t}) or {}
        landed = [k for k, v in pieces.items() if k in ours_sd and torch.equal(ours_sd[k], v)]
        if pieces and not landed:  # one the conversion fuses with its siblings (xcit: timm's q, k, v -> qkv):
            # a dim-0 block, bit-exact, of a tensor that the whole state dict's conversion lands in ours
            fused = convert_from_timm(fz.get_model_cfg(name), theirs.state_dict())
            landed = [k for k, v in fused.items() if k not in theirs.state_dict() and k in ours_sd
                      and torch.equal(ours_sd[k], v) and any(torch.equal(c, t) for c in v.split(len(t)))][:1]
            pieces = dict.fromkeys(landed)
        assert pieces and len(landed) == len(pieces), f"{twin}:{tname} not found (or only partly) in {name}"
    size = IDENTICAL_AT.get(fz.registry.model_module(name))
    if size:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_timm_source_for_feature_model_and_refusal():
    theirs = _randomised(timm.create_model("resnet18", pretrained=False))
    feat = fz.create_model("resnet18", features_only=True, out_indices=[1, 2, 3, 4])
    fz.load_checkpoint(feat, theirs.state_dict(), source="timm")
    ref = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    ref.load_state_dict(theirs.state_dict(), strict=False)
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        for a, b in zip(feat.eval()(x), ref.eval()(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(fz.CheckpointError, match="no timm twin"):
        fz.load_checkpoint(fz.create_model("resnext152_64x4d"), {"conv1.weight": torch.zeros(1)}, source="timm")
    with pytest.raises(ValueError, match="source='tim'"):
        fz.load_checkpoint(feat, theirs.state_dict(), source="tim")
