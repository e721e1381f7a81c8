"""VOLO checks. MindCV's VOLO cannot run in MindSpore 2.10 (tests/zoo.py PARITY_EXCEPTIONS: its
``ops.pad`` call passes nested tuples, which MindSpore 2.10 rejects on every device; past that, the CPU
build has no ``ExtractImagePatches`` kernel for ``nn.Unfold``, and its ``Fold`` feeds a float16 kernel to
a float32 ``Conv2DTranspose``), so instead:

* the parameter tree equals MindCV's (names and shapes from its reference meta, which records them
  before the forward fails) and timm's ``volo_d*_224`` (the declared twins), counts included;
* with the same weights, our network gives timm's logits and timm's stage features once MindCV's four
  differences are swapped back to timm's, and each swap is shown to matter (in float64, where even
  the LayerNorm eps stands far above rounding):
  1. the outlook-attention values: MindSpore's ``nn.Unfold`` orders channels (window row, window
     column, channel) like TensorFlow, MindCV reshapes them as (channel, position) like torch's;
  2. GELU: MindSpore's tanh approximation, timm's exact;
  3. LayerNorm eps: MindSpore's 1e-7, timm's 1e-5;
  4. logits: MindCV's ``head(cls)`` only, timm's ``+ 0.5 * max(aux_head(tokens))``;
  this on a small VOLO of the same classes (the whole network) and on volo_d1's own block widths;
* our ``extract_image_patches`` follows MindSpore's kernel index arithmetic (as HaloNet's);
* feature_info, the pyramid, features as the classifier's own activations, other sizes, pruning.
"""
import copy
import math

import pytest
import timm
import timm.models.volo as timm_volo
import torch
import torch.nn.functional as F

import featurezoo as fz
import featurezoo.models.volo as volo_mod
from featurezoo.features import FeatureExtractWrapper
from featurezoo.layers.plain_pyramid import level_sources, staged_feature_info
from featurezoo.models.volo import VOLO, ClassBlock, Outlooker, Transformer, extract_image_patches, model_cfgs
from tests.reference import load_meta
from tests.zoo import HUGE_MODELS, PARITY_EXCEPTIONS, parity_size

NAMES = [f"volo_d{i}" for i in range(1, 6)]
_MS_RENAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
# A small VOLO of the same classes: 64 px native (a 4x4 stride-16 grid), outlookers on the 8x8 stride-8 map.
TINY = dict(layers=(2, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 4, 4, 4), mlp_ratios=(3, 3, 3, 3),
            downsamples=(True, False, False, False), outlook_attention=(True, False, False, False), image_size=64,
            stem_hidden_dim=8, num_classes=10)
SWAPS = ("unfold", "gelu", "eps", "aux")


def _torch_unfold_layout(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """What MindCV's reshape assumes (and timm computes): channel-major windows."""
    n, c, h, w = x.shape
    out_h, out_w = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    return F.unfold(x, kernel, stride=stride).reshape(n, c * kernel * kernel, out_h, out_w)


def _randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Norms that are not the identity and weights of order one (GELU's input leaves its near-linear range)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.15)
        for p in (model.pos_embed, model.cls_token):
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _randomise(VOLO(**TINY))


def _features_of(full: VOLO, **kwargs) -> FeatureExtractWrapper:
    feat = FeatureExtractWrapper(VOLO(**TINY), **kwargs).eval()
    weights = full.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    return feat


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


def _set_swaps(model: torch.nn.Module, swaps, monkeypatch) -> None:
    """MindCV's computation, with the named differences swapped for timm's."""
    monkeypatch.setattr(volo_mod, "extract_image_patches",
                        _torch_unfold_layout if "unfold" in swaps else extract_image_patches)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5 if "eps" in swaps else 1e-7
        if isinstance(m, torch.nn.GELU):
            m.approximate = "none" if "gelu" in swaps else "tanh"


def _logits(model: VOLO, x: torch.Tensor, swaps, monkeypatch) -> torch.Tensor:
    _set_swaps(model, swaps, monkeypatch)
    tokens = model.forward_features(x)
    logits = model.head(tokens[:, 0])
    if "aux" in swaps:
        logits = logits + 0.5 * model.aux_head(tokens[:, 1:]).max(1)[0]
    return logits


# -- MindCV: the recorded failure and the parameter tree -----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_mindcv_cannot_run_it_here(name):
    assert name in PARITY_EXCEPTIONS and parity_size(name) == 224
    meta = load_meta(name, parity_size(name))
    assert meta["error_stage"] == "forward" and "For 'pad'" in meta["error"]
    assert "mindcv/models/volo.py" in meta["error_traceback"]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_tree_equals_mindcv_and_timm(name):
    meta = load_meta(name, parity_size(name))
    theirs = {}
    for key, shape in meta["param_shapes"].items():
        head, _, leaf = key.rpartition(".")
        theirs[f"{head}.{_MS_RENAMES.get(leaf, leaf)}" if head else key] = shape
    with torch.device("meta"):
        model = fz.create_model(name)
        twin = timm.create_model(f"{name}_224")
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == theirs
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    n_ours = sum(p.numel() for p in model.parameters())
    assert n_ours == meta["trainable_params"] == sum(p.numel() for p in twin.parameters())
    assert (n_ours > 150_000_000) == (name in HUGE_MODELS) == (name in ("volo_d4", "volo_d5"))


# -- feature_info and the pyramid ------------------------------------------------------------------------


def test_staged_feature_info_places_derived_levels_by_their_source():
    info = staged_feature_info([(4, 8, ["a.0", "a.1"]), (6, 16, ["b.0", "b.1"])])
    assert [(e["name"], e["reduction"], e["native"]) for e in info] == [
        ("a.0", 8, True), ("a.1@4", 4, False), ("a.1", 8, True), ("b.0", 16, True), ("b.1", 16, True),
        ("b.1@32", 32, False)]
    assert level_sources(info) == [0, 1, 1, 2, 3, 3]
    # A gap between native strides is filled from the finer stage, next to its source.
    gap = staged_feature_info([(4, 8, ["a"]), (6, 32, ["b"])])
    assert [(e["name"], e["reduction"]) for e in gap] == [("a@4", 4), ("a", 8), ("a@16", 16), ("b", 32)]
    with pytest.raises(ValueError, match="must increase"):
        staged_feature_info([(4, 16, ["a"]), (6, 8, ["b"])])


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_is_every_block_then_the_pyramid(name):
    c = model_cfgs[name]
    info = fz.get_feature_info(name)
    outlookers = [f"network.0.{j}" for j in range(c.layers[0])]
    blocks = [f"network.{i + 1}.{j}" for i in range(1, 4) for j in range(c.layers[i])]
    native = [e for e in info if e["native"]]
    assert [e["name"] for e in native] == outlookers + blocks
    assert [(e["chs"], e["reduction"]) for e in native] == [(c.embed_dims[0], 8)] * len(outlookers) + [
        (c.embed_dims[-1], 16)] * len(blocks)
    assert info[0]["name"] == "network.0.0"  # the contract's "fewer parameters for [0]" relies on it
    with torch.device("meta"):
        feat = fz.create_model(name, features_only=True, out_indices="pyramid")
    pyr = feat.feature_info
    assert pyr.reduction() == [4, 8, 16, 32]
    assert pyr.channels() == [c.embed_dims[0]] * 2 + [c.embed_dims[-1]] * 2
    assert pyr.module_name() == [f"{outlookers[-1]}@4", outlookers[-1], blocks[-1], f"{blocks[-1]}@32"]
    assert [e["native"] for e in pyr] == [False, True, True, False]
    # Neither the class-attention blocks nor the heads are levels: the pyramid model holds none of them.
    assert not any(k.startswith(("post_network", "cls_token", "norm", "head", "aux_head"))
                   for k in feat.state_dict())


def test_features_are_the_classifiers_own_activations(tiny):
    """At the native size every block's map is bit-identical to what the classifier computes."""
    blocks = [b for stage in tiny.network if isinstance(stage, torch.nn.Sequential) for b in stage]
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, b in enumerate(blocks)]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            tiny(x)
            feat = _features_of(tiny)
            outs = feat(x)
    finally:
        for h in hooks:
            h.remove()
    native = [i for i, e in enumerate(feat.feature_info) if e["native"]]
    assert len(native) == len(blocks) == 5 and len(seen) == 5
    for block, i in enumerate(native):
        assert outs[i].is_contiguous() and torch.equal(outs[i], seen[block].permute(0, 3, 1, 2)), f"block {block}"
    assert [tuple(outs[i].shape) for i in native] == [(2, 16, 8, 8)] * 2 + [(2, 32, 4, 4)] * 3


def test_derived_levels_are_the_resampled_stage_ends(tiny):
    feat = _features_of(tiny, out_indices="pyramid")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = feat(x)
        names = [e["name"] for e in tiny.feature_info]
        at8, at16 = tiny.forward_levels(x, [names.index("network.0.1"), names.index("network.4.0")])
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    assert torch.equal(outs[1], at8) and torch.equal(outs[2], at16)
    torch.testing.assert_close(outs[0], F.interpolate(at8, scale_factor=2, mode="bilinear"), rtol=0, atol=1e-6)
    assert torch.equal(outs[3], F.max_pool2d(at16, 2))
    assert all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize("hw", [(96, 96), (67, 83)])
def test_other_sizes(tiny, hw):
    """Any size: maps of ceil(size / stride) (the stride-4 level keeps what lies on the image), the position
    embedding resampled (untouched at the native grid), odd stride-8 maps pooled with ceil_mode."""
    feat = _features_of(tiny)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        outs = feat(x)
        assert tiny(x).shape == (1, 10)  # the classifier runs there too
    for out, e in zip(outs, feat.feature_info):
        assert tuple(out.shape) == (1, e["chs"], math.ceil(hw[0] / e["reduction"]), math.ceil(hw[1] / e["reduction"]))
    grid = (math.ceil(hw[0] / 16), math.ceil(hw[1] / 16))
    pos = tiny._pos_embed(grid)
    assert pos.shape == (1, *grid, 32) and not torch.equal(pos[:, :4, :4], tiny.pos_embed)
    assert torch.equal(tiny._pos_embed((4, 4)), tiny.pos_embed)


def test_first_level_only_holds_and_computes_nothing_later(tiny):
    feat = _features_of(tiny, out_indices=[0])
    keys = set(feat.state_dict())
    assert any(k.startswith("network.0.0.") for k in keys)
    assert not any(k.startswith(("network.0.1.", "network.1.", "network.2.", "pos_embed")) for k in keys)
    fired = []
    hook = tiny.network[0][1].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            assert len(tiny.forward_levels(x, [0])) == 1
            assert not fired
            tiny.forward_levels(x, [1])  # the derived stride-4 level needs the last outlooker
            assert fired
    finally:
        hook.remove()
    # The stride-16 levels keep the position embedding.
    assert "pos_embed" in _features_of(tiny, out_indices=[len(tiny.feature_info) - 1]).state_dict()


# -- MindSpore's unfold layout ---------------------------------------------------------------------------


def test_extract_image_patches_follows_mindspore_kernel():
    # Index arithmetic of MindSpore's GPU kernel (NHWC; output depth = (row * k + col) * C + c).
    x = torch.randn(2, 3, 9, 9)
    k, s = 3, 2
    out = extract_image_patches(x, k, s)
    assert out.shape == (2, k * k * 3, 4, 4)
    for i in range(4):
        for j in range(4):
            for r in range(k):
                for c in range(k):
                    for ch in range(3):
                        assert torch.equal(out[:, (r * k + c) * 3 + ch, i, j], x[:, ch, i * s + r, j * s + c])
    torch_order = _torch_unfold_layout(x, k, s)
    perm = [(r * k + c) * 3 + ch for ch in range(3) for r in range(k) for c in range(k)]
    assert torch.equal(out[:, perm], torch_order) and not torch.equal(out, torch_order)


# -- timm: the same network, MindCV's four differences swapped back --------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    theirs = timm_volo.VOLO(layers=list(TINY["layers"]), img_size=64, num_classes=10, stem_hidden_dim=8,
                            embed_dims=list(TINY["embed_dims"]), num_heads=list(TINY["num_heads"]),
                            mlp_ratio=TINY["mlp_ratios"]).eval()
    theirs.load_state_dict(tiny.state_dict())
    ours = VOLO(**TINY).eval()
    ours.load_state_dict(tiny.state_dict())
    return ours.double(), theirs.double()


def test_as_built_the_model_computes_mindcvs_function(tiny, monkeypatch):
    """The swap tests below set every difference explicitly; here the defaults are MindCV's."""
    assert {m.approximate for m in tiny.modules() if isinstance(m, torch.nn.GELU)} == {"tanh"}
    assert {m.eps for m in tiny.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-7}
    assert {(m.eps, m.momentum) for m in tiny.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(1e-5, 0.1)}
    assert volo_mod.extract_image_patches is extract_image_patches
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        as_built = tiny(x)
        assert torch.equal(as_built, _logits(copy.deepcopy(tiny), x, (), monkeypatch))


def test_whole_network_gives_timms_logits_with_the_four_differences_swapped(tiny_pair, monkeypatch):
    ours, theirs = tiny_pair
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(x)
        assert _max_rel_err(_logits(ours, x, SWAPS, monkeypatch), expected) < 1e-12
        for kept in SWAPS:  # each difference alone moves the logits far beyond float64 rounding (eps: 1.7e-4)
            err = _max_rel_err(_logits(ours, x, set(SWAPS) - {kept}, monkeypatch), expected)
            assert err > 1e-5, kept
        assert _max_rel_err(_logits(ours, x, (), monkeypatch), expected) > 1e-2
        _set_swaps(ours, (), monkeypatch)
        assert torch.equal(ours(x), _logits(ours, x, (), monkeypatch))  # MindCV's: head(cls) only


def test_stage_features_equal_timms_intermediates(tiny_pair, monkeypatch):
    ours, theirs = tiny_pair
    names = [e["name"] for e in ours.feature_info]
    stage_ends = [names.index(n) for n in ("network.0.1", "network.2.0", "network.3.0", "network.4.0")]
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs.forward_intermediates(x, intermediates_only=True)
        _set_swaps(ours, ("unfold", "gelu", "eps"), monkeypatch)
        outs = ours.forward_levels(x, stage_ends)
        assert len(outs) == len(expected) == 4
        for a, b in zip(outs, expected):
            assert _max_rel_err(a, b) < 1e-12
        _set_swaps(ours, ("gelu", "eps"), monkeypatch)
        assert _max_rel_err(ours.forward_levels(x, stage_ends[:1])[0], expected[0]) > 1e-2


def test_volo_d1_blocks_equal_timms(monkeypatch):
    """volo_d1's own widths (192 / 6 heads outlookers, 384 / 12 heads transformer and class blocks), in
    float64; an odd 9x11 stride-8 map, where MindCV's floor pool could not run, pools with timm's ceil_mode."""
    c = model_cfgs["volo_d1"]
    torch.manual_seed(0)
    pairs = [
        (Outlooker(c.embed_dims[0], c.num_heads[0], 3),
         timm_volo.Outlooker(c.embed_dims[0], 3, 1, 2, c.num_heads[0], 3.0), (2, 9, 11, c.embed_dims[0])),
        (Transformer(c.embed_dims[-1], c.num_heads[-1], 3),
         timm_volo.Transformer(c.embed_dims[-1], c.num_heads[-1], 3.0), (2, 5, 6, c.embed_dims[-1])),
        (ClassBlock(c.embed_dims[-1], c.num_heads[-1], 3),
         timm_volo.ClassBlock(c.embed_dims[-1], c.num_heads[-1], mlp_ratio=3.0), (2, 31, c.embed_dims[-1])),
    ]
    for ours, theirs, shape in pairs:
        theirs.double().eval()
        ours.load_state_dict(theirs.state_dict())
        ours.double().eval()
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            expected = theirs(x)
            _set_swaps(ours, ("unfold", "gelu", "eps"), monkeypatch)
            assert _max_rel_err(ours(x), expected) < 1e-12, type(ours).__name__
            _set_swaps(ours, (), monkeypatch)
            assert _max_rel_err(ours(x), expected) > 1e-6, type(ours).__name__  # measured >= 3.5e-5
