"""RepMLPNet checks beyond the generic contract and MindCV parity tests: the input sizes
the fixed partition FCs accept, and locality injection (BN and the local conv branches
folded into ``fc3``) computing exactly what the model computed. timm has no RepMLPNet."""
import pytest
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.models.repmlp import RepMLPBlock, RepMLPNet, locality_injection
from tests.reference import load_reference
from tests.zoo import parity_size

NAMES = ["repmlp_t224", "repmlp_t256", "repmlp_b224", "repmlp_b256", "repmlp_d256", "repmlp_l256"]
REPARAM_TOL = 1e-5
PARITY_RTOL = 1e-4


def _max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _randomise_norms(model: nn.Module, seed: int = 1) -> None:
    """BN statistics and affine parameters far from identity, so a wrong fold cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _tiny(deploy: bool = False) -> RepMLPNet:
    """A small RepMLPNet with every feature of the real ones: several sharesets, both branch kernels."""
    return RepMLPNet(num_classes=10, channels=(8, 16, 32, 64), num_blocks=(1, 1, 2, 1), hs=(8, 4, 2, 1),
                     ws=(8, 4, 2, 1), sharesets_nums=(2, 4, 8, 16), reparam_conv_k=(1, 3), deploy=deploy).eval()


def _assert_deployed(model: nn.Module) -> None:
    blocks = [m for m in model.modules() if isinstance(m, RepMLPBlock)]
    assert blocks and all(b.deploy and b.fc3.bias is not None and isinstance(b.fc3_bn, nn.Identity) for b in blocks)
    assert not any(".repconv" in k or ".fc3_bn." in k for k in model.state_dict())


# -- input sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", [("repmlp_t224", 224), ("repmlp_t256", 256)])
def test_feature_shapes_at_the_design_size(name, size):
    model = fz.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, size, size))
    for out, entry in zip(outs, model.feature_info):
        assert tuple(out.shape) == (1, entry["chs"], size // entry["reduction"], size // entry["reduction"])


def test_accepted_sizes_are_224k_to_224k_plus_3():
    # The unpadded stride-4/stride-2 embeddings round down: 227 px gives 224 px's maps
    # (not ceil(size / reduction)); 228 px or 64 px cannot be cut into the 56x56 partitions (the
    # declared side rule refuses them, naming the valid sides).
    model = fz.create_model("repmlp_t224", features_only=True, out_indices=[0]).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 227, 227))[0].shape == (1, 64, 56, 56)
        assert model(torch.randn(1, 3, 448, 451))[0].shape == (1, 64, 112, 112)
        for size in (64, 67, 228, 256):
            with pytest.raises(ValueError, match=r"is not a size it takes: sides s with s % 224 in \[0, 1, 2, 3\] and s >= 224"):
                model(torch.randn(1, 3, size, size))


def test_feature_info_and_head():
    with torch.device("meta"):
        model = fz.create_model("repmlp_b224")
        feat = fz.create_model("repmlp_b224", features_only=True, out_indices=[1])
    assert model.feature_info == [
        dict(chs=96, reduction=4, name="stages.0.1"), dict(chs=192, reduction=8, name="stages.1.1"),
        dict(chs=384, reduction=16, name="stages.2.11"), dict(chs=768, reduction=32, name="stages.3.1")]
    assert model.default_cfg.fixed_input_size and model.default_cfg.classifier_names == ("head_norm", "head")
    # Only what stage 2 needs is kept: no later stage or embedding, no head, not the unused conv2d.
    tops = {k.split(".")[0] for k in feat.state_dict()}
    assert tops == {"conv_embedding", "stages", "embeds"}
    assert {k.split(".")[1] for k in feat.state_dict() if k.startswith(("stages.", "embeds."))} == {"0", "1"}


# -- locality injection ------------------------------------------------------------------------


def test_injection_keeps_logits_of_a_small_net():
    model = _tiny()
    _randomise_norms(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        after = model.locality_injection()(x)
    _assert_deployed(model)
    assert _max_rel_err(after, before) <= REPARAM_TOL
    # The deployed tree is what deploy=True builds.
    built = _tiny(deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    built.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(built(x), after)


def test_local_branches_matter():
    # Without the local conv branches the output changes: the fold test above could fail.
    model = _tiny()
    _randomise_norms(model, seed=4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        block = model.stages[2][0].repmlp_block
        weight, bias = block.get_equivalent_fc3()
        without_branches = _tiny()
        without_branches.load_state_dict(model.state_dict())
        for m in without_branches.modules():
            if isinstance(m, RepMLPBlock):
                m.reparam_conv_k = None
        assert _max_rel_err(without_branches(x), before) > 1e-2
    assert weight.dtype == torch.float64 and weight.shape == block.fc3.weight.shape and bias.shape == (8 * 2 * 2,)


def test_injection_keeps_every_feature():
    model = fz.create_model("repmlp_t224", features_only=True).eval()
    _randomise_norms(model, seed=2)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        returned = locality_injection(model)
        after = model(x)
    assert returned is model
    _assert_deployed(model)
    for i, (a, b) in enumerate(zip(after, before)):
        assert _max_rel_err(a, b) <= REPARAM_TOL, f"feature {i}"


def test_injection_after_loading_mindcv_checkpoint(tmp_path):
    name = "repmlp_t224"
    ref = load_reference(name, parity_size(name))
    x = torch.from_numpy(ref.input)
    model = fz.create_model(name, checkpoint_path=str(ref.ckpt)).eval()
    with torch.no_grad():
        logits = model(x)
        deployed = model.locality_injection()
        d_logits = deployed(x)
    assert _max_rel_err(d_logits, logits) <= REPARAM_TOL
    assert _max_rel_err(d_logits, torch.from_numpy(ref.logits)) <= PARITY_RTOL
    saved = tmp_path / "repmlp_t224_deploy.pt"
    torch.save(deployed.state_dict(), saved)
    built = fz.create_model(name, deploy=True, checkpoint_path=str(saved)).eval()
    with torch.no_grad():
        assert torch.equal(built(x), d_logits)


@pytest.mark.parametrize("name", NAMES)
def test_deploy_build_matches_injected_tree(name):
    with torch.device("meta"):
        built = fz.create_model(name, deploy=True)
        full = fz.create_model(name)
    hws = {k: v.shape for k, v in full.state_dict().items() if k.endswith(".fc3.weight")}
    shapes = {k: v.shape for k, v in built.state_dict().items()}
    assert all(shapes[k] == s and shapes[k[:-len("weight")] + "bias"] == (s[0],) for k, s in hws.items())
    assert not any(".repconv" in k or ".fc3_bn." in k for k in shapes)
    # Folding drops 2 conv weights + 2 BNs per branch pair and the fc3 BN, adds the fc3 bias.
    n_full = sum(p.numel() for p in full.parameters())
    n_built = sum(p.numel() for p in built.parameters())
    blocks = [m for m in full.modules() if isinstance(m, RepMLPBlock)]
    removed = sum(b.S * (1 + 9) + 2 * 2 * b.S + 2 * b.S - b.fc3.out_channels for b in blocks)
    assert n_full - n_built == removed


def test_injection_is_idempotent_and_needs_blocks():
    model = _tiny()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        once = locality_injection(model)(x)
        twice = locality_injection(model)(x)
    assert torch.equal(once, twice)
    with pytest.raises(RuntimeError, match="already deployed"):
        model.stages[0][0].repmlp_block.get_equivalent_fc3()
    with pytest.raises(ValueError, match="RepMLPBlock"):
        locality_injection(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        RepMLPBlock(8, 16, 4, 4)
