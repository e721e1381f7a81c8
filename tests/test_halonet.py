"""HaloNet checks. MindSpore's CPU build has no ExtractImagePatches kernel, so MindCV
cannot produce a reference here (tests/zoo.py PARITY_EXCEPTIONS); instead:

* the parameter tree equals MindCV's (names and shapes from its reference meta) and
  timm's ``halonet50ts`` (same count, one-to-one renaming);
* with timm's weights, every block computes what timm's does, and the whole network
  gives timm's logits once the two places where MindCV's architecture differs from
  timm's are swapped for timm's versions; each swap is shown to matter:
  1. the stem's max pool: MindCV pads with zeros (``ops.Pad`` then a ``valid`` pool),
     timm with -inf;
  2. the halo windows: MindSpore's ``nn.Unfold`` orders its channels (window row,
     window column, channel) like TensorFlow, MindCV reshapes them as (channel,
     position) like ``torch.unfold``: keys and values mix channels and positions;
* our ``extract_image_patches`` follows MindSpore's GPU kernel index arithmetic.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
import featurezoo.models.halonet as halonet_mod
from featurezoo.models.halonet import HaloAttention, extract_image_patches
from tests.reference import load_meta
from tests.zoo import PARITY_EXCEPTIONS, parity_size

NAME, TIMM_NAME = "halonet_50t", "halonet50ts"
_MS_RENAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _timm_to_ours(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "stages":  # stages.<i>.<j>.rest -> stage<i+1>.blocks.<j>.rest
        parts = [f"stage{int(parts[1]) + 1}", "blocks", *parts[2:]]
    elif parts[:2] == ["head", "fc"]:
        parts = ["classifier", "1", *parts[2:]]
    key = ".".join(parts)
    return (key.replace(".shortcut.", ".creat_shortcut.").replace(".post_attn.", ".post_attn.bn.")
            .replace(".height_rel", ".rel_height").replace(".width_rel", ".rel_width"))


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith(("height_rel", "width_rel")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = timm.create_model(TIMM_NAME, pretrained=False).eval()
    _randomise(theirs, seed=1)
    ours = fz.create_model(NAME).eval()
    ours.load_state_dict({_timm_to_ours(k): v for k, v in theirs.state_dict().items()}, strict=True)
    return ours, theirs


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _torch_unfold_layout(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """What MindCV's reshape assumes (and timm computes): channel-major windows."""
    n, c, h, w = x.shape
    out_h, out_w = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    return F.unfold(x, kernel, stride=stride).reshape(n, c * kernel * kernel, out_h, out_w)


# -- MindCV: the parameter tree and the recorded CPU failure --------------------------------------


def test_mindcv_cannot_run_it_here():
    assert NAME in PARITY_EXCEPTIONS
    meta = load_meta(NAME, parity_size(NAME))
    assert "ExtractImagePatches" in meta["error"] and meta["error_stage"] == "forward"


def test_parameter_tree_equals_mindcv_and_timm():
    meta = load_meta(NAME, parity_size(NAME))
    theirs = {}
    for key, shape in meta["param_shapes"].items():
        head, _, leaf = key.rpartition(".")
        theirs[f"{head}.{_MS_RENAMES.get(leaf, leaf)}"] = shape
    with torch.device("meta"):
        model = fz.create_model(NAME)
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == theirs
    n_ours = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        n_timm = sum(p.numel() for p in timm.create_model(TIMM_NAME).parameters())
    assert n_ours == meta["trainable_params"] == n_timm == 22_733_280


def test_pyramid_agrees_with_timm():
    with torch.device("meta"):
        ours = fz.create_model(NAME, features_only=True, out_indices="pyramid").feature_info
    theirs = timm.create_model(TIMM_NAME, features_only=True, pretrained=False).feature_info
    # Same levels, channels and reductions; names follow MindCV's tree (stage1..4) where
    # timm's byobnet has stages.0-2 and final_conv (an identity here).
    assert ours.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    assert ours.channels() == theirs.channels() == [64, 256, 512, 1024, 2048]
    assert ours.module_name() == ["stem.conv3", "stage1", "stage2", "stage3", "stage4"]


# -- input sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [256, 249])
def test_feature_shapes_at_sizes_halo_attention_accepts(size):
    # Every stage map must be a multiple of the block size 8: sides 256k-7..256k.
    model = fz.create_model(NAME, features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, size, size))
    for out, entry in zip(outs, model.feature_info):
        side = math.ceil(size / entry["reduction"])
        assert tuple(out.shape) == (1, entry["chs"], side, side), entry["name"]


@pytest.mark.parametrize("size", [64, 67, 248])
def test_sizes_halo_attention_cannot_take_fail_clearly(size):
    model = fz.create_model(NAME, features_only=True).eval()
    # Refused by the declared side rules before the forward, naming the sides nearby that work.
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{size}x{size} px is not a size it takes.*"
                                                          r"valid sides near it"):
        model(torch.randn(1, 3, size, size))
    # The levels before the first map that is not a multiple of 8 still work.
    shallow = fz.create_model(NAME, features_only=True, out_indices=[0, 1]).eval()
    with torch.no_grad():
        assert [o.shape[1] for o in shallow(torch.randn(1, 3, size, size))] == [64, 256]


# -- MindSpore's unfold layout --------------------------------------------------------------------


def test_extract_image_patches_follows_mindspore_kernel():
    # Index arithmetic of MindSpore's GPU kernel (NHWC; output depth = (row * k + col) * C + c).
    x = torch.randn(2, 3, 10, 10)
    k, s = 4, 3
    out = extract_image_patches(x, k, s)
    assert out.shape == (2, k * k * 3, 3, 3)
    for i in range(3):
        for j in range(3):
            for r in range(k):
                for c in range(k):
                    for ch in range(3):
                        assert torch.equal(out[:, (r * k + c) * 3 + ch, i, j], x[:, ch, i * s + r, j * s + c])
    # torch's unfold orders the same values channel-major.
    torch_order = _torch_unfold_layout(x, k, s)
    perm = [(r * k + c) * 3 + ch for ch in range(3) for r in range(k) for c in range(k)]
    assert torch.equal(out[:, perm], torch_order) and not torch.equal(out, torch_order)


# -- timm: the same layers compute the same, the two MindCV differences are real --------------------


def test_bottleneck_blocks_equal_timms(pair):
    ours, theirs = pair
    torch.manual_seed(2)
    checked = 0
    for i, t_stage in enumerate(theirs.stages):
        for j, t_block in enumerate(t_stage):
            block = getattr(ours, f"stage{i + 1}").blocks[j]
            if type(block).__name__ != "BottleneckBlock":
                continue
            x = torch.randn(1, t_block.conv1_1x1.conv.in_channels, 16, 16)
            with torch.no_grad():
                assert _max_rel_err(block(x), t_block(x)) <= 1e-5, f"stage{i + 1}.blocks.{j}"
            checked += 1
    assert checked == 11  # 16 blocks, 5 of them halo attention


def test_attention_differs_from_timm_only_by_unfold_layout(pair, monkeypatch):
    ours, theirs = pair
    attn, t_attn = ours.stage3.blocks[1].self_attn, theirs.stages[2][1].self_attn
    assert isinstance(attn, HaloAttention)
    x = torch.randn(2, attn.kv.in_channels, 16, 24)
    with torch.no_grad():
        expected = t_attn(x)
        mindspore_layout = attn(x)
        monkeypatch.setattr(halonet_mod, "extract_image_patches", _torch_unfold_layout)
        timm_layout = attn(x)
    assert _max_rel_err(timm_layout, expected) <= 1e-5
    assert _max_rel_err(mindspore_layout, expected) > 0.05


def test_whole_network_gives_timms_logits_with_timms_pool_and_unfold(pair, monkeypatch):
    ours, theirs = pair
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = theirs(x)
        as_mindcv = ours(x)
        monkeypatch.setattr(halonet_mod, "extract_image_patches", _torch_unfold_layout)
        only_pool_differs = ours(x)
        monkeypatch.setattr(ours.stem, "pad", nn.ConstantPad2d(1, float("-inf")))
        as_timm = ours(x)
    assert _max_rel_err(as_timm, expected) <= 1e-4
    assert _max_rel_err(only_pool_differs, expected) > 1e-3
    assert _max_rel_err(as_mindcv, expected) > 1e-2


def test_stem_pool_pads_with_zeros():
    # After SiLU the stem can be negative everywhere near a border: zero padding then wins the max.
    stem = fz.create_model(NAME).stem.eval()
    x = torch.full((1, 64, 4, 4), -0.2)
    out = stem.pool(stem.pad(x))
    # Windows that reach the padding see its zeros; the one inside the map keeps -0.2.
    expected = torch.tensor([[0.0, 0.0], [0.0, -0.2]]).expand(1, 64, 2, 2)
    assert torch.equal(out, expected)
