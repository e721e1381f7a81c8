"""CMT checks beyond the generic contract and MindCV parity tests (parity runs at each name's
native size: 160/192/224/256 px):

* the levels of TRANSFORMERS.md (stem at stride 2, the last block of each stage);
* features are the classifier path's own activations, bit for bit, at the native size;
* any input size: ``relative_pos`` is MindCV's zero constant (not in its checkpoint); off the
  native grid the model adds nothing, which equals a model built for that grid (adding zeros
  of the grid's shape); shapes at two other sizes, one with odd sides (``same`` padding);
* ``out_indices=[0]`` computes nothing past the stem;
* timm has no CMT.
"""
import pytest
import timm
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.models.cmt import CMT, model_cfgs
from tests.reference import load_meta
from tests.zoo import ref_args

NAMES = ["cmt_tiny", "cmt_xsmall", "cmt_small", "cmt_base"]
NATIVE = {"cmt_tiny": 160, "cmt_xsmall": 192, "cmt_small": 224, "cmt_base": 256}


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", NAMES)
def test_levels_and_native_size(name):
    cfg = fz.get_model_cfg(name)
    assert cfg.fixed_input_size and cfg.input_size == (3, NATIVE[name], NATIVE[name])
    info = fz.get_feature_info(name, out_indices="pyramid")
    c = model_cfgs[name]
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert info.channels() == [c.stem_channel, *c.embed_dims]
    assert info.module_name() == ["stem_norm3"] + [f"blocks_{s}.{d - 1}" for s, d in zip("abcd", c.depths)]


def test_tiny_levels():
    assert [(e["name"], e["chs"], e["reduction"]) for e in fz.get_feature_info("cmt_tiny")] == [
        ("stem_norm3", 16, 2), ("blocks_a.1", 46, 4), ("blocks_b.1", 92, 8), ("blocks_c.9", 184, 16),
        ("blocks_d.1", 368, 32)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = fz.create_model("cmt_tiny").eval()
    _randomise_norms(model)
    return model


def test_features_are_the_classifier_paths_activations(tiny):
    feat = fz.create_model("cmt_tiny", features_only=True).eval()
    fz.load_checkpoint(feat, tiny.state_dict())
    seen = {}
    for entry in tiny.feature_info:
        tiny.get_submodule(entry["name"]).register_forward_hook(
            lambda m, i, o, key=entry["name"]: seen.__setitem__(key, (o, i[1] if len(i) > 1 else None)))
    x = torch.randn(1, 3, 160, 160)  # the native size
    try:
        with torch.no_grad():
            logits = tiny(x)
            outs = feat(x)
    finally:
        for entry in tiny.feature_info:
            tiny.get_submodule(entry["name"])._forward_hooks.clear()
    assert logits.shape == (1, 1000)
    for entry, out in zip(tiny.feature_info, outs):
        act, grid = seen[entry["name"]]
        if grid is not None:  # a block: tokens (B, H*W, C) on the grid passed along
            act = act.transpose(1, 2).reshape(1, -1, *grid)
        assert out.is_contiguous() and torch.equal(out, act), entry["name"]


def test_relative_pos_is_a_zero_constant_outside_the_checkpoint(tiny):
    heads, sr = (1, 2, 4, 8), (8, 4, 2, 1)
    for i, s in enumerate("abcd"):
        n = (160 // 2 ** (i + 2)) ** 2
        buf = getattr(tiny, f"relative_pos_{s}")
        assert buf.shape == (heads[i], n, n // sr[i] ** 2) and not buf.any()
    assert not any("relative_pos" in k for k in tiny.state_dict())
    assert not any("relative_pos" in k for k in load_meta("cmt_tiny", **ref_args("cmt_tiny"))["param_shapes"])


@pytest.mark.parametrize("side", [96, 128])
def test_other_grids_compute_what_zeros_of_that_shape_compute(tiny, side):
    # A CMT built for this size holds MindCV's zero relative_pos for its grids (and adds it);
    # the 160 px model at this size adds nothing. The two must agree.
    rebuilt = CMT(**{**vars(model_cfgs["cmt_tiny"]), "img_size": side}).eval()
    rebuilt.load_state_dict(tiny.state_dict())
    assert rebuilt.relative_pos_a.shape == (1, (side // 4) ** 2, (side // 32) ** 2)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ours, theirs = tiny(x), rebuilt(x)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())
        # Adding anything but zeros (or a constant per query) changes the output: the comparison can fail.
        rebuilt.relative_pos_d[..., 0] = 5.0
        assert not torch.allclose(ours, rebuilt(x), rtol=0, atol=1e-3 * theirs.abs().max().item())


@pytest.mark.parametrize("size", [(224, 224), (97, 130)])
def test_other_sizes(size):
    model = fz.create_model("cmt_tiny", features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    for out, entry in zip(outs, model.feature_info):
        r = entry["reduction"]
        assert out.shape == (1, entry["chs"], -(-size[0] // r), -(-size[1] // r)), entry["name"]


def test_first_level_computes_nothing_further():
    model = fz.create_model("cmt_tiny", features_only=True, out_indices=[0]).eval()
    assert [n for n, _ in model.named_children()] == [f"stem_{k}{i}" for i in (1, 2, 3)
                                                     for k in ("conv", "relu", "norm")]
    assert not any(n.startswith("relative_pos") for n, _ in model.named_buffers())
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 16, 32, 32)


def test_timm_has_no_cmt():
    assert not timm.list_models("cmt*")
    assert not any(fz.get_model_cfg(n).timm_twin for n in NAMES)
