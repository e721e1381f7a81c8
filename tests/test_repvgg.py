"""RepVGG family checks beyond the generic contract and MindCV parity tests:
timm's second opinion on the pyramid, and the re-parameterisation (training
form -> single 3x3 conv per block) computing exactly what the model computed."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo.models.repvgg import RepVGG, RepVGGBlock, repvgg_model_convert
from tests.reference import load_reference

TIMM_TWINS = [("repvgg_a0", "repvgg_a0"), ("repvgg_b0", "repvgg_b0")]
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


def _assert_deployed(model: nn.Module) -> None:
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert blocks and all(b.deploy and isinstance(b.rbr_reparam, nn.Conv2d) for b in blocks)
    assert not any(hasattr(b, name) for b in blocks for name in ("rbr_dense", "rbr_1x1", "rbr_identity"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(".rbr_reparam." in k or ".se." in k for k in model.state_dict() if k.startswith("stage"))


# -- timm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, timm_name", TIMM_TWINS)
def test_pyramid_agrees_with_timm(name, timm_name):
    with torch.device("meta"):
        ours = fz.create_model(name, features_only=True, out_indices="pyramid").feature_info
    theirs = timm.create_model(timm_name, features_only=True, pretrained=False).feature_info
    # Same levels, channels and reductions. Deliberate difference: names follow MindCV's tree
    # (stage0..stage4) rather than timm's byobnet one (stem, stages.0-2, final_conv).
    assert ours.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    assert ours.channels() == theirs.channels()
    assert ours.module_name() == ["stage0", "stage1", "stage2", "stage3", "stage4"]


# -- re-parameterisation -----------------------------------------------------------------------


def test_convert_full_model_keeps_logits():
    model = fz.create_model("repvgg_a0").eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        deployed = repvgg_model_convert(model)
        after = deployed(x)
    _assert_deployed(deployed)
    assert _max_rel_err(after, before) <= REPARAM_TOL
    # do_copy (the default) leaves the training form alone.
    assert isinstance(model.stage1[1].rbr_identity, nn.BatchNorm2d) and model.stage1[1].rbr_reparam is None


def test_convert_feature_model_keeps_every_feature():
    model = fz.create_model("repvgg_a0", features_only=True).eval()
    _randomise_norms(model, seed=2)
    x = torch.randn(2, 3, 67, 67)  # odd size: stride-2 convs pad symmetrically, both branches alike
    with torch.no_grad():
        before = model(x)
        returned = repvgg_model_convert(model, do_copy=False)
        after = model(x)
    assert returned is model
    _assert_deployed(model)
    assert model.out_channels == [48, 48, 96, 192, 1280]
    assert len(after) == len(before) == 5
    for i, (a, b) in enumerate(zip(after, before)):
        assert _max_rel_err(a, b) <= REPARAM_TOL, f"feature {i}"


@pytest.mark.parametrize("use_se", [False, True])
def test_convert_grouped_blocks_with_identity(use_se):
    # Grouped convs with an identity branch need a grouped identity kernel; SE sits after the fold.
    groups = {1: 2, 2: 4, 3: 2, 5: 4, 6: 2}
    model = RepVGG(num_blocks=(2, 2, 2, 1), num_classes=10, width_multiplier=(0.5, 0.5, 0.5, 0.5),
                   override_group_map=groups, use_se=use_se).eval()
    grouped = [b for b in model.modules() if isinstance(b, RepVGGBlock) and b.group > 1]
    assert any(b.rbr_identity is not None for b in grouped)
    _randomise_norms(model, seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        after = model.switch_to_deploy()(x)
    _assert_deployed(model)
    assert model.stage1[1].rbr_reparam.groups == 4 and model.stage3[1].rbr_reparam.groups == 2
    assert _max_rel_err(after, before) <= REPARAM_TOL


def test_equivalent_kernel_is_differentiable():
    block = RepVGGBlock(8, 8, 3, stride=1, padding=1).eval()
    kernel, bias = block.get_equivalent_kernel_bias()
    (kernel.square().sum() + bias.sum()).backward()
    for p in block.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_convert_after_loading_mindcv_checkpoint(tmp_path):
    ref = load_reference("repvgg_a0", 64)
    x = torch.from_numpy(ref.input)
    model = fz.create_model("repvgg_a0", checkpoint_path=str(ref.ckpt)).eval()
    feat = fz.create_model("repvgg_a0", features_only=True, checkpoint_path=str(ref.ckpt)).eval()
    with torch.no_grad():
        logits, feats = model(x), feat(x)
        saved = tmp_path / "repvgg_a0_deploy.pt"
        deployed = repvgg_model_convert(model, save_path=str(saved))
        deployed_feat = repvgg_model_convert(feat)
        d_logits, d_feats = deployed(x), deployed_feat(x)
    assert _max_rel_err(d_logits, logits) <= REPARAM_TOL
    assert _max_rel_err(d_logits, torch.from_numpy(ref.logits)) <= PARITY_RTOL
    assert len(d_feats) == len(ref.features) == 5
    for i, (a, b, expected) in enumerate(zip(d_feats, feats, ref.features)):
        assert _max_rel_err(a, b) <= REPARAM_TOL, f"feature {i}"
        assert _max_rel_err(a, torch.from_numpy(expected)) <= PARITY_RTOL, f"feature {i} vs MindCV"
    # The saved inference form loads, by its own names, into a model built deployed.
    built = fz.create_model("repvgg_a0", deploy=True, checkpoint_path=str(saved)).eval()
    assert set(built.state_dict()) == set(deployed.state_dict())
    with torch.no_grad():
        assert torch.equal(built(x), d_logits)


def test_deploy_build_matches_converted_tree():
    with torch.device("meta"):
        built = fz.create_model("repvgg_b1g4", deploy=True)
        converted = repvgg_model_convert(fz.create_model("repvgg_b1g4"))
    shapes = {k: v.shape for k, v in converted.state_dict().items()}
    assert {k: v.shape for k, v in built.state_dict().items()} == shapes
    assert shapes["stage1.1.rbr_reparam.weight"] == (128, 32, 3, 3)  # 4 groups on block 2


def test_convert_is_idempotent_and_needs_blocks():
    model = RepVGG(num_blocks=(1, 1, 1, 1), num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.25)).eval()
    once = repvgg_model_convert(model)
    twice = repvgg_model_convert(once)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
    with pytest.raises(ValueError, match="RepVGGBlock"):
        repvgg_model_convert(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kernel_size=3"):
        RepVGGBlock(4, 4, kernel_size=5, padding=2)
    with pytest.raises(ValueError, match="block 0"):
        RepVGG(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 1, 1, 1), override_group_map={0: 2})


def test_deepcopy_of_feature_model_is_independent():
    # repvgg_model_convert copies by default; the copy of a feature wrapper must not share blocks.
    model = fz.create_model("repvgg_a0", features_only=True, out_indices=[1, 3]).eval()
    clone = copy.deepcopy(model)
    repvgg_model_convert(clone, do_copy=False)
    assert model.stage1[0].rbr_reparam is None and clone.stage1[0].rbr_reparam is not None
    assert "stage4" not in dict(clone.named_children())
