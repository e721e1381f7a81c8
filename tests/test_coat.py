"""CoaT / CoaT-Lite: the pyramid, features from the classifier's own path, any input size,
MindSpore's checkpoint names, and timm's coat_* with the two differences swapped.

MindCV parity of the logits (224 px, MindCV's own checkpoint) is tests/test_parity_mindcv.py;
MindCV has no features_only for CoaT, so the features are checked here to be, bit for bit, the
activations of that same classifier path.

timm computes CoaT differently in two places, swapped here to show everything else equal:
1. the serial block's attention residual: MindCV adds to the block's input, ``x + attn(norm1(cpe(x)))``;
   timm adds to the position-encoded tokens, ``cpe(x) + attn(norm1(cpe(x)))``;
2. the parallel blocks' cross-scale resampling: MindCV resizes to the other stage's grid with
   ``align_corners=True``; timm scales by 2 or 4 with ``align_corners=False``.
"""
import re

import pytest
import timm
import timm.models.coat as timm_coat
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz

LITE, FULL = "coat_lite_tiny", "coat_tiny"
# TRANSFORMERS.md: one level per stage, strides 4/8/16/32; CoaT's levels 1-3 come from the parallel blocks.
EXPECTED_CHS = {
    "coat_tiny": [152, 152, 152, 152], "coat_mini": [152, 216, 216, 216], "coat_small": [152, 320, 320, 320],
    "coat_lite_tiny": [64, 128, 256, 320], "coat_lite_mini": [64, 128, 320, 512],
    "coat_lite_small": [64, 128, 320, 512], "coat_lite_medium": [128, 256, 320, 512],
}


def _randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """LayerNorms away from the identity, so a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


def _build(name: str, state=None, **kwargs) -> nn.Module:
    """A model built on the meta device (no initialisation: fast) and filled by loading ``state``."""
    with torch.device("meta"):
        model = fz.create_model(name, **kwargs)
    model = model.to_empty(device="cpu").eval()
    if state is not None:
        report = fz.load_checkpoint(model, state)
        assert not report.missing
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {n: _randomise(fz.create_model(n)) for n in (LITE, FULL)}


@pytest.fixture(scope="module")
def features(models):
    return {n: _build(n, m.state_dict(), features_only=True) for n, m in models.items()}


def _nchw(tokens: torch.Tensor, side: int) -> torch.Tensor:
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


@pytest.mark.parametrize("name", sorted(EXPECTED_CHS))
def test_pyramid_channels_and_strides(name):
    info = fz.get_feature_info(name)
    assert [e["chs"] for e in info] == EXPECTED_CHS[name]
    assert [e["reduction"] for e in info] == [4, 8, 16, 32]
    lite = name.startswith("coat_lite")
    assert [e["name"] for e in info] == (["serial_blocks1", "serial_blocks2", "serial_blocks3", "serial_blocks4"]
                                         if lite else ["serial_blocks1"] + [f"parallel_blocks:x{i}" for i in (2, 3, 4)])
    with torch.device("meta"):
        pyramid = fz.create_model(name, features_only=True, out_indices="pyramid")
    assert pyramid.out_indices == [0, 1, 2, 3] and pyramid.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("name", [LITE, FULL])
def test_features_are_the_classifier_paths_activations(models, features, name):
    """At 224 px (where MindCV's logits are checked) every level equals, bit for bit, the tokens the
    classifier's forward computes: the last serial block of each stage (CoaT-Lite), or serial stage 1
    and the last parallel block's stages 2-4 (CoaT)."""
    full = models[name]
    seen = {}
    hooks = []
    if name == LITE:
        for i in range(1, 5):
            hooks.append(getattr(full, f"serial_blocks{i}")[-1].register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__(i - 1, out)))
    else:
        hooks.append(full.serial_blocks1[-1].register_forward_hook(lambda m, a, out: seen.__setitem__(0, out)))
        hooks.append(full.parallel_blocks[-1].register_forward_hook(
            lambda m, a, out: seen.update({i: out[i] for i in (1, 2, 3)})))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        full(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        outs = features[name](x)
    assert len(outs) == 4
    for i, (out, side) in enumerate(zip(outs, (56, 28, 14, 7))):
        assert out.is_contiguous()
        assert torch.equal(out, _nchw(seen[i], side)), f"{name} level {i}"


@pytest.mark.parametrize("name", [LITE, FULL])
def test_other_input_sizes(features, name):
    """No position embeddings: any size runs; unpadded patch embeddings give floor(size / reduction)."""
    for h, w in ((96, 160), (100, 131)):
        with torch.no_grad():
            outs = features[name](torch.randn(1, 3, h, w))
        chs = EXPECTED_CHS[name]
        assert [tuple(o.shape) for o in outs] == [(1, c, h // r, w // r) for c, r in zip(chs, (4, 8, 16, 32))]
        assert all(torch.isfinite(o).all() for o in outs)


def test_level_0_holds_and_computes_nothing_deeper(models):
    for name in (LITE, FULL):
        feat = _build(name, models[name].state_dict(), features_only=True, out_indices=[0])
        for gone in ("patch_embed2", "cls_token2", "cpe2", "crpe2", "serial_blocks2", "serial_blocks4",
                     "parallel_blocks", "norm4", "head"):
            assert not hasattr(feat._backbone, gone), f"{name}: {gone} kept for level 0"
        assert hasattr(feat._backbone, "serial_blocks1")
        with torch.no_grad():
            (out,) = feat(torch.randn(1, 3, 20, 28))  # far too small for the deeper stages
        assert out.shape == (1, EXPECTED_CHS[name][0], 5, 7)
    # CoaT's level 1 needs every serial stage and all parallel blocks, but no classifier.
    feat = _build(FULL, models[FULL].state_dict(), features_only=True, out_indices=[1])
    fired = []
    feat._backbone.parallel_blocks[-1].register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        (out,) = feat(torch.randn(1, 3, 64, 64))
    assert fired and out.shape == (1, 152, 8, 8)
    assert not any(hasattr(feat._backbone, n) for n in ("norm2", "norm3", "norm4", "aggregate", "head"))
    # CoaT-Lite's level 1 stops after serial stage 2: stage 3 is never called.
    feat = _build(LITE, models[LITE].state_dict(), features_only=True, out_indices=[1])
    assert not hasattr(feat._backbone, "serial_blocks3")
    fired = []
    feat._backbone.serial_blocks2[-1].register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        feat(torch.randn(1, 3, 64, 64))
    assert fired


def test_too_small_inputs_raise(models, features):
    with pytest.raises(ValueError, match=r"input 28x40 px is too small; the smallest it takes is 32x32 px"):
        features[LITE](torch.randn(1, 3, 28, 40))
    full = _build(FULL, models[FULL].state_dict(), features_only=True, out_indices=[1])
    with pytest.raises(ValueError, match="parallel blocks need all four stages"):
        full(torch.randn(1, 3, 40, 31))
    with torch.no_grad():  # the smallest size that runs
        assert full(torch.randn(1, 3, 32, 32))[0].shape == (1, 152, 4, 4)


def _to_mindspore_names(state, parallel: bool):
    """Our module paths -> the names MindSpore saves for the shared modules (see featurezoo.models.coat)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^cpe(\d)\.", r"serial_blocks\1.0.cpe.", k)
        if parallel and not k.startswith("crpe1."):
            k = re.sub(r"^crpe(\d)\.", r"parallel_blocks.0.factoratt_crpe\1.crpe.", k)
        else:
            k = re.sub(r"^crpe(\d)\.", r"serial_blocks\1.0.factoratt_crpe.crpe.", k)
        out[k] = v
    return out


@pytest.mark.parametrize("name", [LITE, FULL])
def test_mindspore_saved_names_and_module_paths_both_load(models, name):
    src = models[name].state_dict()
    saved = _to_mindspore_names(src, parallel=name == FULL)
    assert len(set(saved) - set(src)) == 4 * 2 + 4 * 6  # every cpe (weight, bias) and crpe (3 convs) tensor
    for state in (saved, src):
        dst = _build(name)
        report = fz.load_checkpoint(dst, state)
        assert not report.missing and not report.unexpected
        loaded = dst.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in src.items())


def _mindcv_serial_forward(self, x, size):
    """timm's SerialBlock with MindCV's residual: the attention adds to the input, not to cpe(x)."""
    x = x + self.drop_path(self.factoratt_crpe(self.norm1(self.cpe(x, size)), size))
    return x + self.drop_path(self.mlp(self.norm2(x)))


def _mindcv_interpolate(self, x, scale_factor, size):
    """timm's ParallelBlock resampling as MindCV's: to the other grid's size, align_corners=True."""
    b, n, c = x.shape
    h, w = size
    img = x[:, 1:].transpose(1, 2).reshape(b, c, h, w)
    img = F.interpolate(img, size=(round(h * scale_factor), round(w * scale_factor)), mode="bilinear",
                        align_corners=True)
    return torch.cat((x[:, :1], img.flatten(2).transpose(1, 2)), dim=1)


@pytest.mark.parametrize("name", [LITE, FULL])
def test_timm_twin_equal_with_the_differences_swapped(name, monkeypatch):
    torch.manual_seed(0)
    theirs = _randomise(timm.create_model(name, img_size=64), seed=2)
    ours = _build(name)
    report = fz.load_checkpoint(ours, theirs.state_dict())  # detected as timm's names
    assert not report.missing and not report.unexpected
    # Every timm tensor lands, bit-exact: whole, or (fused qkv) as our q, k, v, or (Conv1d) reshaped.
    ours_sd = ours.state_dict()
    for tname, t in theirs.state_dict().items():
        if any(v.shape == t.shape and torch.equal(v, t) for v in ours_sd.values()):
            continue
        if ".qkv." in tname:
            parts = [ours_sd[tname.replace(".qkv.", f".{p}.")] for p in "qkv"]
            assert torch.equal(torch.cat(parts), t), tname
        else:
            assert tname == "aggregate.weight" and torch.equal(ours_sd[tname].flatten(), t.flatten()), tname
    feat = _build(name, theirs.state_dict(), features_only=True)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = ours(x), feat(x)
        as_is = theirs(x)
        monkeypatch.setattr(timm_coat.SerialBlock, "forward", _mindcv_serial_forward)
        residual_only = theirs.forward_intermediates(x, intermediates_only=True)
        monkeypatch.setattr(timm_coat.ParallelBlock, "interpolate", _mindcv_interpolate)
        swapped = theirs(x)
        their_feats = theirs.forward_intermediates(x, intermediates_only=True)
    assert _rel(logits, swapped) < 1e-5
    for a, b in zip(feats, their_feats):
        assert _rel(a, b) < 1e-5
    # Each swap matters.
    assert _rel(logits, as_is) > 1e-2
    if name == FULL:  # the resampling reaches levels 1-3 only
        assert torch.equal(residual_only[0], feats[0])
        assert min(_rel(a, b) for a, b in zip(feats[1:], residual_only[1:])) > 1e-3
    else:  # no parallel blocks in CoaT-Lite
        assert all(torch.equal(a, b) for a, b in zip(residual_only, their_feats))
