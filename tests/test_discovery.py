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
from featurezoo.freezing import probe_input_size
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


# -- the zoo's own models: discovery on the classifier against the declared feature_info -----------------
# The smallest model of each family (by parameters), at the probe size the contract tests use.
ZOO_SMALLEST = {
    "bit": "BiT_resnet50", "cait": "cait_xxs24_224", "cmt": "cmt_tiny", "coat": "coat_tiny", "convit": "convit_tiny",
    "convnext": "convnextv2_atto", "crossvit": "crossvit_9", "densenet": "densenet121", "dpn": "dpn92",
    "edgenext": "edgenext_xx_small", "efficientnet": "efficientnet_b0", "ghostnet": "ghostnet_050",
    "googlenet": "googlenet", "halonet": "halonet_50t", "hrnet": "hrnet_w32", "inceptionv3": "inception_v3",
    "inceptionv4": "inception_v4", "mae": "mae_b_16_224_finetune", "mixnet": "mixnet_s",
    "mlpmixer": "mlp_mixer_s_p16", "mnasnet": "mnasnet_050", "mobilenetv1": "mobilenet_v1_025",
    "mobilenetv2": "mobilenet_v2_035_96", "mobilenetv3": "mobilenet_v3_small_075", "mobilevit": "mobilevit_xx_small",
    "nasnet": "nasnet_a_4x1056", "pit": "pit_ti", "pnasnet": "pnasnet", "poolformer": "poolformer_s12",
    "pvt": "pvt_tiny", "pvtv2": "pvt_v2_b0", "regnet": "regnet_x_200mf", "repmlp": "repmlp_t224",
    "repvgg": "repvgg_a0", "res2net": "res2net50", "resnest": "resnest14", "resnet": "resnet18",
    "resnetv2": "resnetv2_50", "rexnet": "rexnet_09", "senet": "seresnet18", "shufflenetv1": "shufflenet_v1_g3_05",
    "shufflenetv2": "shufflenet_v2_x0_5", "sknet": "skresnet18", "squeezenet": "squeezenet1_1", "swin": "swin_tiny",
    "swinv2": "swinv2_tiny_window8", "vgg": "vgg11", "visformer": "visformer_tiny_v2", "vit": "vit_b_16_224",
    "volo": "volo_d1", "xception": "xception", "xcit": "xcit_tiny_12_p16_224",
}
# Families whose discovered pyramid is not the declared one: [(channels, reduction)] found, and why.
ZOO_DIFFERENT = {
    # plain models: the declared stride-4/8/32 levels are derived (resampled) from one block; the model
    # computes one stride-16 map, its final norm
    "cait": ([(192, 16)], "plain: derived levels"), "convit": ([(192, 16)], "plain: derived levels"),
    "mae": ([(768, 16)], "plain: derived levels"), "mlpmixer": ([(512, 16)], "plain: derived levels"),
    "vit": ([(768, 16)], "plain: derived levels"),
    "volo": ([(64, 2), (192, 8), (384, 16)], "stride-2 stem conv is a map; the @4 and @32 levels are derived"),
    "xcit": ([(24, 2), (48, 4), (96, 8), (192, 16)], "conv stem maps, then one stride-16 map; @4/@8/@32 derived"),
    # the last map at stride 32 (16) is the 1x1 head conv before the global pool, not the last block
    "cmt": ([(16, 2), (46, 4), (92, 8), (184, 16), (1280, 32)], "head conv at stride 32"),
    "rexnet": ([(16, 2), (36, 4), (56, 8), (117, 16), (1152, 32)], "head conv at stride 32"),
    "squeezenet": ([(64, 2), (128, 4), (256, 8), (1000, 16)], "the classifier is a 1x1 conv on the stride-16 map"),
    # paths in parallel to the end: only what every path passes through is a level
    "coat": ([(152, 4), (152, 8)], "parallel blocks carry stages 2-4 together to the end"),
    "hrnet": ([(64, 2), (256, 4), (2048, 32)], "parallel branches meet only in the final fusion"),
    "nasnet": ([(32, 2), (1056, 32)], "each cell takes the two previous cells' outputs"),
    "pnasnet": ([(32, 2), (1080, 32)], "each cell takes the two previous cells' outputs"),
    "crossvit": (None, "two branches to the end, no single map on every path: no levels (ValueError)"),
}


@pytest.mark.parametrize("family", list(ZOO_SMALLEST))
def test_discovery_on_zoo_classifiers_matches_declared_stage_ends(family):
    name = ZOO_SMALLEST[family]
    cfg = fz.get_model_cfg(name)
    torch.manual_seed(0)
    model = fz.create_model(name).eval()
    size = cfg.input_size if cfg.fixed_input_size else (3, *probe_input_size(cfg))
    declared = [(e["chs"], e["reduction"]) for e in fz.get_feature_info(name, out_indices="pyramid")]
    expected, _why = ZOO_DIFFERENT.get(family, (declared, ""))
    if expected is None:
        with pytest.raises(ValueError, match="no feature levels found"):
            fz.discover(model, size, method=("fx", "hooks"))
        return
    found = fz.discover(model, size, method=("fx", "hooks"))  # export with free sizes is slow on some
    assert [(e["chs"], e["reduction"]) for e in found.info] == expected
    assert (expected == declared) == (family not in ZOO_DIFFERENT)
