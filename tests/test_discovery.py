"""Discovery (featurezoo.discovery, issue 16): models no one here wrote become featurezoo backbones.

Expected pyramids are literal tables from timm 1.0.31's ``feature_info`` for the same architecture
(``timm.create_model(name).feature_info``) or the model's own documentation; outputs are compared
bit for bit with the original model's module activations, captured with forward hooks."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import featurezoo as fz
from featurezoo.cli import main
from featurezoo.extract import load_features
from featurezoo.features import LevelFeatures, ShapeSpec
from tests.test_extract import write_good_images

# name -> [(level name, channels, reduction, layout)]; random weights, probed at 64x64 px (vit_b_16 built for
# 64 px: its position embedding fixes the size) to keep the test cheap; the strides are those at 224 px.
SIZE = 64
TORCHVISION = {
    # timm resnet50: act1 64@2, layer1..4 256@4 512@8 1024@16 2048@32
    "resnet50": [("relu", 64, 2, "NCHW"), ("layer1", 256, 4, "NCHW"), ("layer2", 512, 8, "NCHW"),
                 ("layer3", 1024, 16, "NCHW"), ("layer4", 2048, 32, "NCHW")],
    # timm mobilenetv3_large_100: blocks.0 16@2, blocks.1 24@4, blocks.2 40@8, blocks.4 112@16, blocks.6 960@32
    "mobilenet_v3_large": [("features.1", 16, 2, "NCHW"), ("features.3", 24, 4, "NCHW"), ("features.6", 40, 8, "NCHW"),
                           ("features.12", 112, 16, "NCHW"), ("features", 960, 32, "NCHW")],
    # timm efficientnet_b0: 16@2, 24@4, 40@8, 112@16, and 320@32 (blocks.6): timm stops before the 1x1 head
    # conv; the rule takes the last map at stride 32, which is torchvision's features.8 (1280 channels).
    "efficientnet_b0": [("features.1", 16, 2, "NCHW"), ("features.2", 24, 4, "NCHW"), ("features.3", 40, 8, "NCHW"),
                        ("features.5", 112, 16, "NCHW"), ("features", 1280, 32, "NCHW")],
    # timm convnext_tiny: stages.0..3 96@4 192@8 384@16 768@32
    "convnext_tiny": [("features.1", 96, 4, "NCHW"), ("features.3", 192, 8, "NCHW"), ("features.5", 384, 16, "NCHW"),
                      ("features", 768, 32, "NCHW")],
    # timm regnety_004: stem 32@2, s1..s4 48@4 104@8 208@16 440@32
    "regnet_y_400mf": [("stem", 32, 2, "NCHW"), ("trunk_output.block1", 48, 4, "NCHW"),
                       ("trunk_output.block2", 104, 8, "NCHW"), ("trunk_output.block3", 208, 16, "NCHW"),
                       ("trunk_output", 440, 32, "NCHW")],
    # timm densenet121: norm0 64@2, denseblock1..3 256@4 512@8 1024@16, norm5 1024@32 (here the functional
    # ReLU torchvision applies after norm5)
    "densenet121": [("features.relu0", 64, 2, "NCHW"), ("features.denseblock1", 256, 4, "NCHW"),
                    ("features.denseblock2", 512, 8, "NCHW"), ("features.denseblock3", 1024, 16, "NCHW"),
                    ("relu", 1024, 32, "NCHW")],
    # timm swin_tiny_patch4_window7_224: layers.0..3 96@4 192@8 384@16 768@32 (channels-last inside)
    "swin_t": [("features.1", 96, 4, "NHWC"), ("features.3", 192, 8, "NHWC"), ("features.5", 384, 16, "NHWC"),
               ("permute", 768, 32, "NCHW")],
    # timm vit_base_patch16_224: blocks.i 768@16; the pyramid is the last one (here the encoder's final norm)
    "vit_b_16": [("encoder", 768, 16, "tokens")],
}


def _reference(model, x, info):
    """The original model's activations for each level, from forward hooks (cloned: in-place ops follow)."""
    captured = {}
    hooks = []
    functional = {"relu": ("features", F.relu)}  # densenet121: F.relu(features(x)) in its forward
    for entry in info:
        name = entry["name"]
        module_name = functional[name][0] if name not in dict(model.named_modules()) else name
        hooks.append(model.get_submodule(module_name).register_forward_hook(
            lambda m, a, out, key=name: captured.__setitem__(key, out.clone())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    outs = []
    for entry in info:
        t = captured[entry["name"]]
        if entry["name"] not in dict(model.named_modules()):
            t = functional[entry["name"]][1](t)
        if entry["layout"] == "NHWC":
            t = t.permute(0, 3, 1, 2)
        elif entry["layout"] == "tokens":
            side = x.shape[-1] // entry["reduction"]
            t = t[:, entry["prefix_tokens"]:].transpose(1, 2).reshape(1, -1, side, side)
        outs.append(t)
    return outs


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_pyramid_and_bit_identical_outputs(name):
    torch.manual_seed(0)
    model = getattr(tvm, name)(**({"image_size": SIZE} if name == "vit_b_16" else {})).eval()
    backbone = fz.wrap(model, out_indices=None, input_size=(3, SIZE, SIZE))
    info = backbone.feature_info
    assert [(e["name"], e["chs"], e["reduction"], e["layout"]) for e in info] == TORCHVISION[name]
    assert {e["method"] for e in info} == {"fx"}
    assert backbone.out_channels == [c for _, c, _, _ in TORCHVISION[name]]
    assert backbone.out_indices == list(range(len(info)))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        outs = backbone(x)
    for out, ref, entry in zip(outs, _reference(model, x, info), info):
        side = math.ceil(SIZE / entry["reduction"])
        assert out.shape == (1, entry["chs"], side, side)
        assert torch.equal(out, ref), f"{name} {entry['name']}"
    # kept parameters under the model's own names; the head is gone
    keys, full = set(backbone.state_dict()), set(model.state_dict())
    assert keys < full and backbone.full_state_keys == full
    assert not any(k.startswith(("fc.", "classifier.", "head.", "heads.")) for k in keys)


def test_pruned_graph_computes_nothing_past_the_deepest_level_and_loads_the_model_checkpoint():
    torch.manual_seed(0)
    model = tvm.resnet18().eval()
    calls = []
    for path in ("layer1.1.conv2", "layer2.0.conv1", "fc"):
        model.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: calls.append(p))
    backbone = fz.wrap(model, out_indices=[1], input_size=(3, 64, 64))
    calls.clear()  # discovery ran the model at its probes
    assert backbone.feature_info.module_name() == ["layer1"]
    assert not any(k.startswith(("layer2.", "layer3.", "layer4.", "fc.")) for k in backbone.state_dict())
    with torch.no_grad():
        (out,) = backbone(torch.randn(2, 3, 96, 80))  # another size than the probe
    assert out.shape == (2, 64, 24, 20) and calls == ["layer1.1.conv2"]
    torch.manual_seed(1)
    trained = tvm.resnet18().state_dict()
    report = fz.load_checkpoint(backbone, trained)
    assert torch.equal(backbone.state_dict()["layer1.0.conv1.weight"], trained["layer1.0.conv1.weight"])
    assert "fc.weight" in report.skipped_unused and not report.unexpected


def test_contract_options_pyramid_as_dict_and_errors():
    model = tvm.resnet18().eval()
    found = fz.discover(model, (3, 64, 64))
    body = found.backbone("pyramid", as_dict=True, level_names="res{level}", frozen_stages=1, norm_eval=True)
    assert isinstance(body, LevelFeatures) and body.out_indices == [0, 1, 2, 3, 4]
    assert body.output_shape()["res5"] == ShapeSpec(channels=512, stride=32)
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1.", "layer1.")))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("layer2."))
    with torch.no_grad():
        feats = body(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["res1", "res2", "res3", "res4", "res5"]
    with pytest.raises(ValueError, match=r"out_indices entry 7 is out of range.*\n.*index\s+name"):
        found.backbone([7])
    with pytest.raises(ValueError, match="needs an nn.Module"):
        fz.wrap("resnet18")
    with pytest.raises(ValueError, match=r"input_size must be \(channels, height, width\)"):
        fz.wrap(model, input_size=(224, 224))
    with pytest.raises(ValueError, match=r"method='jit' is not valid; use one of \['fx', 'export', 'hooks'\]"):
        fz.wrap(model, method="jit")
    with pytest.raises(ValueError, match="no feature levels found"):
        fz.wrap(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), input_size=(3, 32, 32))


def test_hugging_face_model_from_its_config_by_export():
    import transformers  # pinned in requirements-dev.txt
    torch.manual_seed(0)
    model = transformers.ResNetModel(transformers.ResNetConfig()).eval()  # microsoft/resnet-50's architecture
    backbone = fz.wrap(model, out_indices=None)
    # HF ResNetConfig docs: embedding_size 64, hidden_sizes [256, 512, 1024, 2048]; timm resnet50 strides
    assert [(e["name"], e["chs"], e["reduction"], e["method"]) for e in backbone.feature_info] == [
        ("embedder.embedder", 64, 2, "export"), ("encoder.stages.0", 256, 4, "export"),
        ("encoder.stages.1", 512, 8, "export"), ("encoder.stages.2", 1024, 16, "export"),
        ("encoder", 2048, 32, "export")]
    hooked = ["embedder.embedder", "encoder.stages.0", "encoder.stages.1", "encoder.stages.2", "encoder.stages.3"]
    captured = {}
    for path in hooked:
        model.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: captured.__setitem__(p, o.clone()))
    x = torch.randn(1, 3, 160, 192)  # exported with free sizes: runs at another size than the probe
    with torch.no_grad():
        outs = backbone(x)
        model(x)
    for out, path in zip(outs, hooked):
        assert torch.equal(out, captured[path]), path
    assert set(backbone.state_dict()) <= set(model.state_dict())


class DataDependent(nn.Module):
    """Control flow on values: neither torch.fx nor torch.export can trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.last = nn.Conv2d(16, 32, 3, 2, 1)
        self.head = nn.Linear(32, 10)
        self.head_calls = 0

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > -1e9:
            x = self.down(x)
        x = self.last(x)
        self.head_calls += 1
        return self.head(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_hooks():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = [model.stem(x)]
        ref.append(model.down(ref[0]))
    found = fz.discover(model, (3, 64, 64))
    assert found.method == "hooks" and set(found.failures) == {"fx", "export"}
    assert [(e["name"], e["chs"], e["reduction"], e["method"]) for e in found.info] == [
        ("stem", 8, 2, "hooks"), ("down", 16, 4, "hooks"), ("last", 32, 8, "hooks")]
    backbone = found.backbone([0, 1])
    assert "last.weight" not in backbone.state_dict() and "head.weight" not in backbone.state_dict()
    calls = model.head_calls
    with torch.no_grad():
        outs = backbone(x)
    assert model.head_calls == calls  # stopped after the deepest level
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    with pytest.raises(ValueError, match="prunes the model in place"):
        found.backbone()


class RegisterTokens(nn.Module):
    """A ViT-like model with a class token and 4 register tokens before the patch tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 24, 8, 8)
        self.prefix = nn.Parameter(torch.zeros(1, 5, 24))
        self.block = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 24))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(t.shape[0], -1, -1), t], 1)
        t = t + self.block(t)
        return self.head(t[:, 0])


def test_token_grid_with_prefix_tokens_and_nonsquare_input():
    model = RegisterTokens().eval()
    backbone = fz.wrap(model, input_size=(3, 64, 96))
    (entry,) = backbone.feature_info
    assert (entry["chs"], entry["reduction"], entry["layout"], entry["prefix_tokens"]) == (24, 8, "tokens", 5)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (out,) = backbone(x)
        t = model.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([model.prefix.expand(1, -1, -1), t], 1)
        t = t + model.block(t)
    assert torch.equal(out, t[:, 5:].transpose(1, 2).reshape(1, 24, 8, 12))


def test_cli_info_and_extract_take_a_factory_import_path(tmp_path, capsys):
    assert main(["info", "torchvision.models:resnet18", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "torchvision.models:resnet18: input 3x64x64" in out
    assert [ln.split()[:5] for ln in out.splitlines() if ln.strip().startswith(("0 ", "4 "))] == [
        ["0", "relu", "64", "2", "32x32"], ["4", "layer4", "512", "32", "2x2"]]
    assert main(["info", "torchvision.models:no_such_net"]) == 2
    assert "has no attribute 'no_such_net'" in capsys.readouterr().err
    torch.manual_seed(3)
    model = tvm.resnet18().eval()
    ckpt = tmp_path / "r18.pth"
    torch.save(model.state_dict(), ckpt)
    write_good_images(tmp_path / "photos", 2)
    code = main(["extract", "torchvision.models:resnet18", str(tmp_path / "photos"), "-o", str(tmp_path / "out"),
                 "--checkpoint", str(ckpt), "--size", "64", "--out-indices", "1,4", "--workers", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    feats = load_features(tmp_path / "out")
    assert list(feats.levels) == ["layer1", "layer4"] and feats.meta["settings"]["model"] == "torchvision.models:resnet18"
    assert feats.levels["layer4"].shape == (2, 512, 2, 2)
    # the same maps as the checkpoint's own model gives (hooks on the original)
    from featurezoo.extract import Preprocess
    pre = Preprocess.from_cfg(fz.discover(model, (3, 64, 64)).cfg, (64, 64))
    x = pre.normalize(torch.stack([torch.as_tensor(pre.load(p)) for p in feats.paths]))
    got = {}
    model.layer4.register_forward_hook(lambda m, a, o: got.__setitem__("layer4", o))
    with torch.no_grad():
        model(x)
    assert torch.allclose(feats.levels["layer4"], got["layer4"], atol=1e-5)
