"""EdgeNeXt checks beyond the generic contract and MindCV parity tests."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.checkpoint.mapping import rename_by_rules
from featurezoo.models.edgenext import XCA, LayerNorm2d, SDTAEncoder

LEVELS = ["stages.0", "stages.1", "stages.2", "stages.3"]
NAMES = Path(__file__).parent / "data" / "edgenext_xx_small_mindspore_names.json"


def _randomised(model):
    """Norm affines, layer scales and temperatures of order one, so that every branch shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim == 1 or name.endswith("temperature"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
    return model.eval()


@pytest.mark.parametrize("name, chs", [("edgenext_xx_small", [24, 48, 88, 168]),
                                       ("edgenext_base", [80, 160, 288, 584])])
def test_pyramid_agrees_with_timm(name, chs):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid")
        theirs = timm.create_model(name, features_only=True).feature_info
    assert ours.out_indices == [0, 1, 2, 3]
    assert ours.feature_info.channels() == theirs.channels() == chs
    assert ours.feature_info.reduction() == theirs.reduction() == [4, 8, 16, 32]
    assert ours.feature_info.module_name() == theirs.module_name() == LEVELS


def test_blocks_norms_and_activation():
    with torch.device("meta"):
        model = fz.create_model("edgenext_xx_small")
    sdta = [n for n, m in model.named_modules() if isinstance(m, SDTAEncoder)]
    assert sdta == ["stages.1.1", "stages.2.5", "stages.3.1"]  # the last block of stages 1-3
    assert model.get_submodule("stages.1.1").pos_embd is not None  # position encoding in stage 1 only
    assert model.get_submodule("stages.2.5").pos_embd is None
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)  # MindCV sets 1e-6 (MindSpore's default is 1e-7)
    assert {n for n, m in model.named_modules() if isinstance(m, LayerNorm2d)} == {
        "downsample_layers.0.1", "downsample_layers.1.0", "downsample_layers.2.0", "downsample_layers.3.0"}
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)


def _xca_reference(xca, x, normalize):
    b, n, c = x.shape
    h = xca.num_heads
    q, k, v = xca.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 4, 1)  # (B, heads, head_dim, N) each
    attn = (normalize(q) @ normalize(k).transpose(-2, -1) * xca.temperature).softmax(-1)
    return xca.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c))


def test_xca_normalises_like_mindspore():
    """q and k are normalised over the tokens by MindSpore's L2Normalize, x / sqrt(max(sum(x^2), 1e-4)):
    where a channel's norm is below 1e-2 it is scaled, not made unit length as by F.normalize."""
    xca = _randomised(XCA(8, num_heads=2, qkv_bias=True))
    mindspore_l2 = lambda t: t / t.pow(2).sum(-1, keepdim=True).clamp_min(1e-4).sqrt()  # noqa: E731
    unit_l2 = lambda t: F.normalize(t, dim=-1)  # noqa: E731
    with torch.no_grad():
        xca.qkv.bias.zero_()
        tiny = torch.randn(1, 5, 8) * 1e-4  # every q, k channel has a norm far below 1e-2
        torch.testing.assert_close(xca(tiny), _xca_reference(xca, tiny, mindspore_l2))
        assert not torch.allclose(xca(tiny), _xca_reference(xca, tiny, unit_l2))
        x = torch.randn(2, 9, 8)  # norms well above 1e-2: both agree
        torch.testing.assert_close(xca(x), _xca_reference(xca, x, unit_l2))


def test_features_are_the_classifier_activations_at_the_native_size():
    full = _randomised(fz.create_model("edgenext_xx_small"))
    feat = fz.create_model("edgenext_xx_small", features_only=True).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    seen = {}
    hooks = [full.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in LEVELS]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        full(x)
        outs = feat(x)
    for h in hooks:
        h.remove()
    for name, out in zip(LEVELS, outs):
        assert torch.equal(out, seen[name]), name
        assert out.is_contiguous()


@pytest.mark.parametrize("size", [(100, 100), (67, 83)])
def test_any_size_rounds_up_like_same_padding(size):
    model = fz.create_model("edgenext_xx_small", features_only=True).eval()
    with torch.no_grad():
        shapes = [tuple(o.shape) for o in model(torch.randn(1, 3, *size))]
    assert shapes == [(1, c, math.ceil(size[0] / r), math.ceil(size[1] / r))
                      for c, r in zip([24, 48, 88, 168], [4, 8, 16, 32])]


def test_detector_size_on_meta():
    with torch.device("meta"):
        model = fz.create_model("edgenext_base", features_only=True)
        shapes = [tuple(o.shape) for o in model(torch.randn(1, 3, 800, 1333))]
    assert shapes == [(1, 80, 200, 334), (1, 160, 100, 167), (1, 288, 50, 84), (1, 584, 25, 42)]


def test_level_zero_computes_and_holds_nothing_beyond():
    feat = fz.create_model("edgenext_xx_small", features_only=True, out_indices=[0])
    names = {n for n, _ in feat.named_modules()}
    assert {n.split(".")[0] for n in names if n} == {"downsample_layers", "stages"}
    assert {n.split(".")[1] for n in names if n.count(".") >= 1} == {"0"}
    full = fz.create_model("edgenext_xx_small").eval()
    fired = []
    full.downsample_layers[1].register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        (out,) = full.forward_levels(torch.randn(1, 3, 64, 64), [0])
    assert out.shape == (1, 24, 16, 16) and not fired
    with torch.no_grad():
        full(torch.randn(1, 3, 64, 64))
    assert fired  # the hook does fire when the stage runs


def test_mindcv_saved_names_map_onto_module_paths():
    """The cfg's rules turn every name MindSpore saves into the module path MindCV declares (pairs recorded
    from MindSpore), and leave module paths alone; a checkpoint under the saved names loads completely."""
    pairs = json.loads(NAMES.read_text())["pairs"]
    rules = fz.get_model_cfg("edgenext_xx_small").mindcv_renames
    # Only the final norm and the head, attached directly to the model, are saved under their paths.
    assert {path for path, saved in pairs if path == saved} == {"norm.gamma", "norm.beta", "head.weight", "head.bias"}
    for path, saved in pairs:
        assert list(rename_by_rules({saved: 0}, rules)) == [path], saved
        assert list(rename_by_rules({path: 0}, rules)) == [path], path

    src = _randomised(fz.create_model("edgenext_xx_small"))
    ours = src.state_dict()
    leaf = {"weight": "gamma", "bias": "beta"}
    ms_state = {}
    for path, saved in pairs:
        head, _, last = path.rpartition(".")
        key = path if path in ours else f"{head}.{[k for k, v in leaf.items() if v == last][0]}"
        ms_state[saved] = ours[key]
    dst = fz.create_model("edgenext_xx_small")
    report = fz.load_checkpoint(dst, ms_state)
    assert not report.missing and not report.unexpected
    for key, value in ours.items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_timm_weights_give_timm_outputs():
    """Same network and head as timm's edgenext_xx_small; at a multiple of 32 px MindSpore's `same` padding
    pads nothing and the outputs agree to float32 rounding (the L2Normalize clamp never binds on these
    random maps). Elsewhere our maps round up (ceil) where timm's unpadded convs round down."""
    theirs = _randomised(timm.create_model("edgenext_xx_small"))
    ours = fz.create_model("edgenext_xx_small").eval()
    report = fz.load_checkpoint(ours, theirs.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours.forward_levels(x, [0, 1, 2, 3]), theirs.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        logits, timm_logits = ours(x), theirs(x)
        torch.testing.assert_close(logits, timm_logits, rtol=1e-5, atol=1e-5 * timm_logits.abs().max().item())
        odd = torch.randn(1, 3, 67, 67)
        assert ours.forward_levels(odd, [0])[0].shape[-1] == 17
        assert theirs.forward_intermediates(odd, indices=[0], intermediates_only=True)[0].shape[-1] == 16
