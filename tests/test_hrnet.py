"""HRNet family checks beyond the generic contract and MindCV parity tests.

HRNet's features are MindCV's ``HRNetFeatures`` outputs, served by
``forward_levels`` on the one ``HRNet`` class: these tests check that a
feature model holds and computes only what its outputs need, and that it still
gives exactly the full model's tensors.
"""
import pytest
import timm
import torch

import featurezoo as fz
from tests.reference import load_reference

SIZE = 64
HEAD = ("downsample_modules.", "final_layer.", "classifier.")


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _randomise_bn(model):
    """Non-trivial BatchNorm statistics, so that eval-mode outputs depend on every buffer."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def w32_all():
    """hrnet_w32 feature model with every entry, random weights and BN statistics."""
    torch.manual_seed(0)
    return _randomise_bn(fz.create_model("hrnet_w32", features_only=True))


@pytest.fixture(scope="module")
def w32_all_outputs(w32_all):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return x, w32_all(x)


def _same_weights(out_indices, source):
    model = fz.create_model("hrnet_w32", features_only=True, out_indices=out_indices).eval()
    weights = source.state_dict()
    model.load_state_dict({k: weights[k] for k in model.state_dict()})
    return model


@pytest.mark.parametrize("name, timm_name", [("hrnet_w32", "hrnet_w32"), ("hrnet_w48", "hrnet_w48")])
def test_pyramid_agrees_with_timm(name, timm_name):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid")
    theirs = timm.create_model(timm_name, features_only=True, pretrained=False).feature_info
    # MindCV's HRNetFeatures and timm's default (feature_location="incre") both take the stem and the
    # four final branches after the head's incre_modules bottleneck: the same five maps, same labels.
    assert ours.out_indices == [0, 1, 2, 3, 4]
    assert ours.feature_info.channels() == theirs.channels() == [64, 128, 256, 512, 1024]
    assert ours.feature_info.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    assert ours.feature_info.module_name() == theirs.module_name()


def test_timm_weights_give_timm_features():
    """Same architecture as timm's: timm's feature model's weights (one rename) give timm's features.

    Deliberate differences, all MindCV's: it rounds every upsampled term of the fusions to float16
    (timm and the paper do not), so the comparison is made with ``fp16_upsample=False``, and the default
    is shown to differ; it upsamples to the finer branch's exact size where timm scales by 2**k, so at
    odd input sizes (67 px) timm's fusion fails on a shape mismatch and ours does not; and its head
    convs (``downsample_modules``, ``final_layer``) have no bias where timm's classifier has one, so only
    timm's feature model, not its classifier, shares our parameters.
    """
    torch.manual_seed(0)
    theirs = _randomise_bn(timm.create_model("hrnet_w32", features_only=True, pretrained=False))
    state = {k.replace(".downsample.", ".down_sample."): v for k, v in theirs.state_dict().items()}
    exact = fz.create_model("hrnet_w32", features_only=True, fp16_upsample=False).eval()
    exact.load_state_dict(state)  # strict: the kept modules are exactly timm's feature model
    mindcv_like = fz.create_model("hrnet_w32", features_only=True).eval()
    mindcv_like.load_state_dict(state)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, ours, rounded = theirs(x), exact(x), mindcv_like(x)
    for e, o in zip(expected, ours):
        assert (o - e).abs().max() <= 1e-5 * e.abs().max()
    assert torch.equal(rounded[0], ours[0])  # the stem has no fusion
    assert all(not torch.equal(r, o) for r, o in zip(rounded[1:], ours[1:]))


def test_stem_only_feature_model_holds_only_the_stem(w32_all, w32_all_outputs):
    with torch.device("meta"):
        full = fz.create_model("hrnet_w32")
    stem = _same_weights([0], w32_all)
    assert set(stem.state_dict()) == {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                                      "bn1.running_var", "bn1.num_batches_tracked"}
    assert [n for n, _ in stem.named_children()] == ["conv1", "bn1", "relu"]
    assert _num_params(stem) * 1000 < _num_params(full)
    x, expected = w32_all_outputs
    with torch.no_grad():
        (out,) = stem(x)
    assert torch.equal(out, expected[0])


@pytest.mark.parametrize("index", [1, 2, 3, 4])
def test_single_branch_feature_model_is_pruned_and_exact(index, w32_all, w32_all_outputs):
    one = _same_weights([index], w32_all)
    keys = set(one.state_dict())
    # Head gone; only the requested branch's incre module; the last module fuses into branches 0..index-1.
    assert not any(k.startswith(HEAD) for k in keys)
    assert {k.split(".")[1] for k in keys if k.startswith("incre_modules.")} == {str(index - 1)}
    fused = {int(k.split(".")[3]) for k in keys if k.startswith("stage4.2.fuse_layers.")}
    assert fused == set(range(index))
    assert any(k.startswith("stage4.1.fuse_layers.3.") for k in keys)  # earlier modules keep every fusion
    assert keys < set(w32_all.state_dict())
    assert _num_params(one) < _num_params(w32_all)
    x, expected = w32_all_outputs
    with torch.no_grad():
        (out,) = one(x)
    assert torch.equal(out, expected[index])


def test_unsorted_out_indices_keep_the_order_asked_for(w32_all, w32_all_outputs):
    model = _same_weights([3, 1], w32_all)
    assert model.out_channels == [512, 128]
    x, expected = w32_all_outputs
    with torch.no_grad():
        outs = model(x)
    assert torch.equal(outs[0], expected[3]) and torch.equal(outs[1], expected[1])


def test_classifier_and_features_share_one_forward(w32_all, w32_all_outputs):
    """The classifier's forward_features gives the branches the feature model lifts with incre_modules."""
    full = fz.create_model("hrnet_w32").eval()
    full.load_state_dict({**full.state_dict(), **w32_all.state_dict()})
    x, expected = w32_all_outputs
    with torch.no_grad():
        branches = full.forward_features(x)
        lifted = [incre(b) for incre, b in zip(full.incre_modules, branches)]
    assert len(branches) == 4
    assert all(torch.equal(a, b) for a, b in zip(lifted, expected[1:]))


@pytest.mark.parametrize("out_indices", [None, [1], [0]])
def test_mindcv_classifier_checkpoint_loads_into_feature_models(out_indices):
    ref = load_reference("hrnet_w32", SIZE)
    model = fz.create_model("hrnet_w32", features_only=True, out_indices=out_indices).eval()
    report = fz.load_checkpoint(model, ref.ckpt)
    assert not report.missing and not report.unexpected
    assert set(report.loaded) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert any(k.startswith("classifier") for k in report.skipped_head)
    # Pruned modules' weights (at least the rest of the head) are recognised, not "unexpected".
    assert any(k.startswith("final_layer.") for k in report.skipped_unused)
    # The stem passes through no float16 fusion: MindCV's value to float32 rounding.
    if out_indices in (None, [0]):
        with torch.no_grad():
            stem = model(torch.from_numpy(ref.input))[0]
        expected = torch.from_numpy(ref.features[0])
        assert (stem - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_forward_levels_stops_after_the_stem():
    model = fz.create_model("hrnet_w32").eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    calls = []
    handle = model.conv2.register_forward_hook(lambda *a: calls.append("conv2"))
    with torch.no_grad():
        (stem,) = model.forward_levels(x, [0])
        assert calls == [] and stem.shape == (1, 64, SIZE // 2, SIZE // 2)
        model.forward_levels(x, [0, 1])
    handle.remove()
    assert calls == ["conv2"]
