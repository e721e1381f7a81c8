"""MobileViT checks beyond the generic contract and MindCV parity tests (parity runs at 64 px,
where no unfolding resizes):

* the levels of TRANSFORMERS.md, and a pyramid with timm's channels and strides;
* features are the classifier path's own activations, bit for bit, at the native 256 px;
* any input size, and maps whose sides are not a multiple of the 2x2 patch: MindCV's own
  block (tests/data/mobilevit, written by tools/make_mobilevit_fixture.py) on 7x9 and 10x5
  maps, which it resizes up to 8x10 / 10x6 with bilinear align_corners=True and back;
* ``out_indices=[0]`` computes nothing past ``conv_1``;
* timm's ``mobilevit_*`` are not twins: exactly the BatchNorms of the 1x1 convs into the
  transformer are extra here.
"""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.models.mobilevit import MobileViTBlock, model_cfgs

DATA = Path(__file__).parent / "data" / "mobilevit"
NAMES = ["mobilevit_xx_small", "mobilevit_x_small", "mobilevit_small"]
TIMM = {"mobilevit_xx_small": "mobilevit_xxs", "mobilevit_x_small": "mobilevit_xs", "mobilevit_small": "mobilevit_s"}
LEVELS = ["conv_1", "layer_1", "layer_2", "layer_3", "layer_4", "layer_5", "conv_1x1_exp"]


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


def test_levels_and_pyramid():
    with torch.device("meta"):
        model = fz.create_model("mobilevit_xx_small")
    assert [(e["name"], e["chs"], e["reduction"]) for e in model.feature_info] == [
        ("conv_1", 16, 2), ("layer_1", 16, 2), ("layer_2", 24, 4), ("layer_3", 48, 8), ("layer_4", 64, 16),
        ("layer_5", 80, 32), ("conv_1x1_exp", 320, 32)]
    assert [n for n, _ in model.named_children()] == LEVELS + ["classifier"]


@pytest.mark.parametrize("name", NAMES)
def test_pyramid_has_timms_channels_and_strides(name):
    info = fz.get_feature_info(name, out_indices="pyramid")
    assert info.module_name() == ["layer_1", "layer_2", "layer_3", "layer_4", "conv_1x1_exp"]
    with torch.device("meta"):
        theirs = timm.create_model(TIMM[name], features_only=True)
    assert info.channels() == theirs.feature_info.channels()
    assert info.reduction() == theirs.feature_info.reduction()


def test_features_are_the_classifier_paths_activations():
    torch.manual_seed(0)
    full = fz.create_model("mobilevit_xx_small").eval()
    _randomise_norms(full)
    feat = fz.create_model("mobilevit_xx_small", features_only=True).eval()
    fz.load_checkpoint(feat, full.state_dict())
    seen = {}
    for name in LEVELS:
        getattr(full, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(1, 3, 256, 256)  # the native size
    with torch.no_grad():
        logits = full(x)
        outs = feat(x)
    assert logits.shape == (1, 1000)
    for name, out in zip(LEVELS, outs):
        assert out.is_contiguous() and torch.equal(out, seen[name]), name


@pytest.mark.parametrize("size", [(224, 224), (97, 130)])
def test_other_sizes(size):
    # 224 px: layer_5 is 7x7 (resized to 8x8 for the transformer); 97x130: odd sides at several levels.
    model = fz.create_model("mobilevit_xx_small", features_only=True, out_indices="pyramid").eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    for out, entry in zip(outs, model.feature_info):
        r = entry["reduction"]
        assert out.shape == (1, entry["chs"], -(-size[0] // r), -(-size[1] // r))


def _mindcv_block() -> MobileViTBlock:
    block = MobileViTBlock(8, 12, transformer_dim=16, ffn_dim=32, num_layers=2, head_dim=8, patch=2).eval()
    report = fz.load_checkpoint(block, DATA / "block.ckpt")
    assert not report.missing and not report.unexpected
    return block


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("hw", ["7x9", "10x5"])
def test_unfolding_resize_equals_mindcv(hw):
    block = _mindcv_block()
    ref = np.load(DATA / "block_outputs.npz")
    with torch.no_grad():
        out = block(torch.from_numpy(ref[f"input_{hw}"]))
    assert _rel_err(out, torch.from_numpy(ref[f"output_{hw}"])) < 1e-5


def test_the_fixture_tells_align_corners_apart(monkeypatch):
    # The check above could fail: with timm's align_corners=False the block's output is far off.
    block = _mindcv_block()
    ref = np.load(DATA / "block_outputs.npz")
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: interpolate(*a, **{**k, "align_corners": False}))
    with torch.no_grad():
        out = block(torch.from_numpy(ref["input_7x9"]))
    assert _rel_err(out, torch.from_numpy(ref["output_7x9"])) > 1e-3  # 100x the tolerance above


def test_first_level_computes_nothing_further():
    model = fz.create_model("mobilevit_xx_small", features_only=True, out_indices=[0]).eval()
    assert [n for n, _ in model.named_children()] == ["conv_1"]
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 16, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_timm_is_not_a_twin(name):
    # timm's 1x1 conv into the transformer has no BN (nor SiLU): that is the whole parameter difference.
    with torch.device("meta"):
        ours = fz.create_model(name)
        theirs = timm.create_model(TIMM[name])
    extra = sum(2 * layer.transformer_channels for layer in model_cfgs[name].layers[2:])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) - count(theirs) == extra
    assert not fz.get_model_cfg(name).timm_twin
