"""Backbones as detectors use them: named outputs, frozen stages, norm_eval, and torchvision's
FasterRCNN / RetinaNet / MaskRCNN built on featurezoo backbones (issue 12, items 2 and 3)."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import featurezoo as fz
from featurezoo.detection import FPNBackbone, detection_levels, fpn_backbone


def _frozen(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _prefixes(names, depth=1):
    return {".".join(n.split(".")[:depth]) for n in names}


# ----------------------------------------------------------------------------- named outputs
def test_as_dict_keys_default_to_feature_names_and_keep_values():
    plain = fz.create_model("resnet18", features_only=True, out_indices=[1, 2, 3, 4]).eval()
    named = fz.create_model("resnet18", features_only=True, out_indices=[1, 2, 3, 4], as_dict=True).eval()
    named.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), named(x)
    assert isinstance(b, OrderedDict)
    assert list(b) == ["layer1", "layer2", "layer3", "layer4"]
    for t, u in zip(a, b.values()):
        assert torch.equal(t, u)


def test_level_names_patterns_and_output_shape():
    m = fz.create_model("resnet18", features_only=True, out_indices=[1, 2, 3, 4], as_dict=True,
                        level_names="res{level}")
    assert m.level_names == ["res2", "res3", "res4", "res5"]
    shapes = m.output_shape()
    assert [(k, s.channels, s.stride) for k, s in shapes.items()] == [
        ("res2", 64, 4), ("res3", 128, 8), ("res4", 256, 16), ("res5", 512, 32)]
    with torch.no_grad():
        out = m(torch.randn(1, 3, 96, 64))
    for k, t in out.items():
        assert t.shape[1] == shapes[k].channels
        assert t.shape[-2:] == (math.ceil(96 / shapes[k].stride), math.ceil(64 / shapes[k].stride))
    m = fz.create_model("resnet18", features_only=True, out_indices=[2, 4], as_dict=True, level_names=["c3", "c5"])
    assert list(m.output_shape()) == ["c3", "c5"]
    m = fz.create_model("resnet18", features_only=True, out_indices=[4, 1], level_names="{index}:{stride}")
    assert m.level_names == ["0:32", "1:4"] and not m.as_dict


@pytest.mark.parametrize("kwargs, words", [
    (dict(level_names="p{level}", out_indices=None, model="vit_b_16_224"), "several outputs"),
    (dict(level_names=["a", "b"], out_indices=[1, 2, 3]), "2 names for 3 outputs"),
    (dict(level_names="{nope}", out_indices=[1]), "not a valid pattern"),
    (dict(level_names=3, out_indices=[1]), "level_names must be"),
    (dict(as_dict="yes", out_indices=[1]), "as_dict must be"),
])
def test_bad_naming_options_are_refused(kwargs, words):
    model = kwargs.pop("model", "resnet18")
    with pytest.raises(ValueError, match=words):
        fz.create_model(model, features_only=True, **kwargs)


def test_feature_options_need_features_only():
    for kw in (dict(as_dict=True), dict(frozen_stages=1), dict(norm_eval=True), dict(level_names="p{level}")):
        with pytest.raises(ValueError, match="without features_only=True"):
            fz.create_model("resnet18", **kw)


# ----------------------------------------------------------------------------- frozen stages
RESNET_STAGE_PARAMS = {0: {"conv1", "bn1"}, 1: {"conv1", "bn1", "layer1"}, 2: {"conv1", "bn1", "layer1", "layer2"},
                       4: {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}}


@pytest.mark.parametrize("k", sorted(RESNET_STAGE_PARAMS))
def test_frozen_stages_resnet_means_mmdetection(k):
    m = fz.create_model("resnet18", features_only=True, frozen_stages=k)
    frozen = _frozen(m)
    assert _prefixes(frozen) == RESNET_STAGE_PARAMS[k]
    # Every parameter under the frozen top-level modules, nothing else.
    assert frozen == {n for n, _ in m.named_parameters() if n.split(".")[0] in RESNET_STAGE_PARAMS[k]}


@pytest.mark.parametrize("name, k, expected", [
    ("swin_tiny", 0, {"patch_embed"}),
    # Stage 2 ends at its last block: its patch merging (MindCV's layers.1.downsample) feeds stage 3.
    ("swin_tiny", 2, {"patch_embed", "layers.0", "layers.1.blocks"}),
    ("vit_b_16_224", 0, {"patch_embed", "cls_token", "pos_embed"}),
    ("vit_b_16_224", 3, {"patch_embed", "cls_token", "pos_embed", "blocks.0", "blocks.1", "blocks.2"}),
    ("regnet_x_200mf", 1, {"stem", "stages.0"}),
    ("hrnet_w32", 2, {"conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2"}),
    ("mobilenet_v3_small_100", 1, {"features.0", "features.1", "features.3"}),
])
def test_frozen_stages_other_kinds(name, k, expected):
    with torch.device("meta" if name != "hrnet_w32" else "cpu"):
        m = fz.create_model(name, features_only=True, frozen_stages=k)
    under = tuple(e + "." for e in expected)
    assert _frozen(m) == {n for n, _ in m.named_parameters() if n in expected or n.startswith(under)}
    assert all(any(n == e or n.startswith(e + ".") for n in _frozen(m)) for e in expected)


def test_frozen_stages_range_is_checked():
    with pytest.raises(ValueError, match=r"4 stages.*1\.\.4"):
        fz.create_model("resnet18", features_only=True, frozen_stages=5)
    with pytest.raises(ValueError, match="frozen_stages"):
        fz.create_model("resnet18", features_only=True, frozen_stages="1")


def test_frozen_modules_stay_in_eval_and_norm_eval_freezes_every_bn():
    m = fz.create_model("resnet18", features_only=True, frozen_stages=1).train()
    assert not m.bn1.training and not m.layer1.training and not m.layer1[0].bn1.training
    assert m.layer2.training and m.layer2[0].bn1.training
    m = fz.create_model("resnet18", features_only=True, norm_eval=True).train()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    assert m.layer2.training  # only the norms are switched
    assert all(p.requires_grad for p in m.parameters())
    m.eval().train()  # train() again keeps the rule
    assert not any(b.training for b in bns)


def test_frozen_stages_keep_output_and_checkpoint_names():
    a = fz.create_model("resnet18", features_only=True).eval()
    b = fz.create_model("resnet18", features_only=True, frozen_stages=2, norm_eval=True).eval()
    assert set(a.state_dict()) == set(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for t, u in zip(a(x), b(x)):
            assert torch.equal(t, u)
    # The probe forward that finds the frozen set leaves no trace: BN statistics unchanged.
    fresh = fz.create_model("resnet18", features_only=True)
    assert torch.equal(fresh.bn1.running_mean, torch.zeros(64))


def _synthetic_batch(n=2, h=112, w=128):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h - 8 * i, w, generator=g) for i in range(n)]
    targets = [dict(boxes=torch.tensor([[8.0 + i, 10.0, 60.0, 70.0 + i]]), labels=torch.tensor([1 + i]),
                    masks=torch.zeros(1, h - 8 * i, w, dtype=torch.uint8)) for i in range(n)]
    for t in targets:
        t["masks"][:, 10:70, 8:60] = 1
    return images, targets


def test_faster_rcnn_training_keeps_frozen_stages_bit_identical():
    """A few SGD steps of torchvision's FasterRCNN on a featurezoo backbone + torchvision's FPN."""
    body = fz.create_model("resnet18", features_only=True, out_indices=[1, 2, 3, 4], as_dict=True,
                           level_names="{index}", frozen_stages=2)
    fpn = FeaturePyramidNetwork(body.out_channels, 64, extra_blocks=LastLevelMaxPool())
    backbone = nn.Sequential(OrderedDict(body=body, fpn=fpn))
    backbone.out_channels = 64
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    model = FasterRCNN(backbone, num_classes=3, rpn_anchor_generator=anchors, min_size=112, max_size=128)
    frozen_before = {n: p.detach().clone() for n, p in body.named_parameters() if not p.requires_grad}
    live_before = {n: p.detach().clone() for n, p in body.named_parameters() if p.requires_grad}
    stats = {n: b.clone() for n, b in body.named_buffers() if "running" in n}
    assert _prefixes(frozen_before) == {"conv1", "bn1", "layer1", "layer2"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = _synthetic_batch()
    model.train()
    for _ in range(3):
        losses = model(images, targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(body.named_parameters())
    for n, v in frozen_before.items():
        assert torch.equal(params[n], v), n
    moved = [n for n, v in live_before.items() if not torch.equal(params[n], v)]
    assert set(_prefixes(moved)) == {"layer3", "layer4"}
    buffers = dict(body.named_buffers())
    for n, v in stats.items():
        same = torch.equal(buffers[n], v)
        assert same == n.startswith(("bn1.", "layer1.", "layer2.")), n


# ----------------------------------------------------------------------------- the ready-made FPN backbone
def test_detection_levels_are_the_pyramid_from_stride_4():
    assert detection_levels("resnet18") == [1, 2, 3, 4]
    info = fz.get_feature_info("mobilenet_v3_small_100")
    assert [info[i]["reduction"] for i in detection_levels("mobilenet_v3_small_100")] == [4, 8, 16, 32]
    assert [info[i]["reduction"] for i in detection_levels("mobilenet_v3_small_100", min_stride=8)] == [8, 16, 32]


def test_fpn_backbone_trainable_levels_follow_torchvision():
    bb = fpn_backbone("resnet18", trainable_levels=3)
    assert _prefixes(_frozen(bb.body)) == {"conv1", "bn1", "layer1"}  # torchvision's default trainable_layers=3
    assert not _frozen(fpn_backbone("resnet18", trainable_levels=5).body)
    assert _prefixes(_frozen(fpn_backbone("resnet18", trainable_levels=0).body)) == RESNET_STAGE_PARAMS[4]
    with pytest.raises(ValueError, match="trainable_levels"):
        fpn_backbone("resnet18", trainable_levels=6)
    with pytest.raises(ValueError, match="extra_blocks"):
        fpn_backbone("resnet18", extra_blocks="p6")
    with pytest.raises(ValueError, match="as_dict=True"):
        FPNBackbone(fz.create_model("resnet18", features_only=True))


def _detector(kind, name):
    if kind == "retina":
        bb = fpn_backbone(name, out_indices=detection_levels(name, min_stride=8), extra_blocks="p6p7",
                          out_channels=64)
    else:
        bb = fpn_backbone(name, out_channels=64)
    n = len(bb.output_shape())
    anchors = AnchorGenerator(tuple((16 * 2 ** i,) for i in range(n)), ((0.5, 1.0, 2.0),) * n)
    if kind == "retina":
        return bb, RetinaNet(bb, num_classes=3, anchor_generator=anchors, min_size=112, max_size=128)
    cls = FasterRCNN if kind == "faster" else MaskRCNN
    return bb, cls(bb, num_classes=3, rpn_anchor_generator=anchors, min_size=112, max_size=128)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small_100", "hrnet_w32"])
@pytest.mark.parametrize("kind", ["faster", "retina", "mask"])
def test_torchvision_detectors_on_featurezoo_backbones(kind, name):
    bb, model = _detector(kind, name)
    shapes = bb.output_shape()
    images, targets = _synthetic_batch()
    with torch.no_grad():
        maps = bb(torch.randn(1, 3, 112, 128))
    assert list(maps) == list(shapes)
    for k, t in maps.items():
        assert t.shape[1] == 64 and t.shape[-1] == math.ceil(128 / shapes[k].stride), k
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in bb.body.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-3:])
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    if kind == "mask":
        assert "masks" in out[0]
