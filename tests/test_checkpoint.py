"""Checkpoint loading: every format, name rules, reports, and bad input that
must leave the model untouched."""
import os
import random

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import featurezoo as fz
from featurezoo import CheckpointError
from featurezoo.checkpoint.mindspore_ckpt import write_mindspore_ckpt


def _ms_names(state):
    """What MindSpore would call our tensors (BN leaves renamed, no num_batches_tracked)."""
    leaf = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    out = {}
    bn_prefixes = {k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        prefix, _, name = k.rpartition(".")
        out[f"{prefix}.{leaf[name]}" if prefix in bn_prefixes else k] = v
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1)
    m = fz.create_model("resnet18").eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k in sb)


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin", ".safetensors", ".ckpt"])
def test_every_format_loads_into_full_and_feature_models(tmp_path, trained, ext):
    path = tmp_path / f"w{ext}"
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    if ext == ".ckpt":
        write_mindspore_ckpt(_ms_names(state), path)
    elif ext == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # nested, as training scripts save
    full = fz.create_model("resnet18", checkpoint_path=str(path)).eval()
    assert _same(full, trained)
    feat = fz.create_model("resnet18", features_only=True, out_indices=[2], checkpoint_path=str(path)).eval()
    assert _same(feat, trained)
    x = torch.randn(1, 3, 64, 64)
    expected = trained.layer2(trained.layer1(trained.max_pool(trained.relu(trained.bn1(trained.conv1(x))))))
    torch.testing.assert_close(feat(x)[0], expected)


def test_report_names_what_happened(trained):
    feat = fz.create_model("resnet18", features_only=True, out_indices=[1])
    report = fz.load_checkpoint(feat, _ms_names(trained.state_dict()))
    assert "layer1.0.bn1.weight" in report.loaded
    assert ("bn1.gamma", "bn1.weight", "MindSpore leaf name") in report.remapped
    assert set(report.skipped_head) == {"classifier.weight", "classifier.bias"}
    assert "layer4.1.conv2.weight" in report.skipped_unused
    assert not report.missing and not report.unexpected


def test_float16_checkpoint_loads_into_float32_model(tmp_path, trained):
    path = tmp_path / "half.ckpt"
    write_mindspore_ckpt({k: v.half() for k, v in _ms_names(trained.state_dict()).items()}, path)
    m = fz.create_model("resnet18", checkpoint_path=str(path))
    assert m.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(m.conv1.weight, trained.conv1.weight.half().float())


def test_ema_weights(trained):
    state = trained.state_dict()
    mixed = {**{k: torch.zeros_like(v) for k, v in state.items()}, **{f"ema.{k}": v for k, v in state.items()}}
    m = fz.create_model("resnet18")
    fz.load_checkpoint(m, mixed, ema=True)
    assert _same(m, trained)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        fz.load_checkpoint(fz.create_model("resnet18"), state, ema=True)
    nested = fz.create_model("resnet18")
    fz.load_checkpoint(nested, {"state_dict": mixed, "state_dict_ema": state}, ema=True)
    assert _same(nested, trained)


def test_shape_mismatch_is_an_error_and_changes_nothing(trained):
    m = fz.create_model("resnet18")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = dict(trained.state_dict())
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"layer1.0.conv1.weight: checkpoint \[64, 64, 1, 1\] vs model"):
        fz.load_checkpoint(m, bad)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_missing_and_unexpected_keys(trained):
    state = dict(trained.state_dict())
    del state["layer3.0.bn2.running_var"]
    m = fz.create_model("resnet18")
    with pytest.raises(CheckpointError, match=r"1 missing \['layer3.0.bn2.running_var'\]"):
        fz.load_checkpoint(m, state)
    report = fz.load_checkpoint(m, state, strict=False)
    assert report.missing == ["layer3.0.bn2.running_var"]
    state = dict(trained.state_dict(), extra_thing=torch.ones(3))
    with pytest.raises(CheckpointError, match=r"1 unexpected \['extra_thing'\]"):
        fz.load_checkpoint(fz.create_model("resnet18"), state)


def test_checkpoint_of_another_architecture(trained):
    with pytest.raises(CheckpointError, match="(?s)shape mismatch.*looks like resnet18"):
        fz.load_checkpoint(fz.create_model("resnet50"), trained.state_dict())
    with pytest.raises(CheckpointError, match="looks like resnet18"):
        fz.load_checkpoint(fz.create_model("resnet34"), _ms_names(trained.state_dict()))


def test_ckpt_is_saved_under_mindspore_names(tmp_path, trained):
    from featurezoo.checkpoint.mindspore_ckpt import read_mindspore_ckpt

    path = fz.save_checkpoint(trained, tmp_path / "r18.ckpt")
    names = set(read_mindspore_ckpt(path))
    assert names == set(_ms_names(trained.state_dict()))
    assert "layer1.0.bn1.moving_variance" in names and "conv1.weight" in names
    assert _same(fz.create_model("resnet18", checkpoint_path=str(path)), trained)


def test_more_input_channels_repeat_and_rescale(trained):
    m = fz.create_model("resnet18", in_channels=5)
    fz.load_checkpoint(m, trained.state_dict())
    w = trained.conv1.weight
    expected = torch.cat([w, w[:, :2]], 1) * 3 / 5
    torch.testing.assert_close(m.conv1.weight, expected)


def test_training_state_in_mindspore_checkpoints_is_ignored(trained):
    state = dict(_ms_names(trained.state_dict()), learning_rate=torch.tensor(0.1), global_step=torch.tensor(5),
                 **{"moments.conv1.weight": torch.zeros(64, 3, 7, 7)})
    report = fz.load_checkpoint(fz.create_model("resnet18"), state)
    assert set(report.ignored) == {"learning_rate", "global_step", "moments.conv1.weight"}


def test_other_num_classes_keeps_own_head(trained):
    m = fz.create_model("resnet18", num_classes=10)
    report = fz.load_checkpoint(m, trained.state_dict())
    assert set(report.skipped_head) == {"classifier.weight", "classifier.bias"}
    assert m.classifier.weight.shape == (10, 512)
    assert torch.equal(m.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)


def test_single_channel_input_adapts_first_conv(trained):
    m = fz.create_model("resnet18", in_channels=1)
    report = fz.load_checkpoint(m, trained.state_dict())
    assert report.adapted == ["conv1.weight"]
    torch.testing.assert_close(m.conv1.weight, trained.conv1.weight.sum(1, keepdim=True))


def test_prefixed_names_need_auto_mapping(trained):
    state = {f"module.backbone.{k}": v for k, v in trained.state_dict().items()}
    with pytest.raises(CheckpointError, match="auto_mapping=True"):
        fz.load_checkpoint(fz.create_model("resnet18"), state)
    m = fz.create_model("resnet18")
    report = fz.load_checkpoint(m, state, auto_mapping=True)
    assert _same(m, trained)
    assert ("module.backbone.conv1.weight", "conv1.weight", "strip 'module.', strip 'backbone.'") in report.remapped


class Deep(nn.Module):
    """18 modules in one Sequential: MindCV's flattened names run to features_17."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*[nn.Conv2d(4, 4, 1) for _ in range(18)])


def test_flattened_names_map_exactly_unlike_mindcv_auto_map():
    src = Deep()
    flat = {k.replace("features.", "features_", 1): v.clone() for k, v in src.state_dict().items()}
    dst = Deep()
    report = fz.load_checkpoint(dst, flat, auto_mapping=True)
    # MindCV's difflib-based auto_map pairs features_17 with features.7; ours maps it to features.17.
    assert ("features_17.weight", "features.17.weight", "flattened name") in report.remapped
    assert torch.equal(dst.features[17].weight, src.features[17].weight)
    assert torch.equal(dst.features[7].weight, src.features[7].weight)


def test_equal_shape_fallback_refuses_ambiguity():
    src = Deep()
    renamed = {k.replace("features", "stuff"): v for k, v in src.state_dict().items()}
    with pytest.raises(CheckpointError, match="cannot pair 18 checkpoint tensor"):
        fz.load_checkpoint(Deep(), renamed, auto_mapping=True)
    single = nn.Sequential(nn.Conv2d(4, 5, 1, bias=False))
    report = fz.load_checkpoint(single, {"whatever.w": torch.ones(5, 4, 1, 1)}, auto_mapping=True)
    assert report.remapped == [("whatever.w", "0.weight", "only tensor of this shape left")]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="never runs code"):
        fz.create_model("resnet18", checkpoint_path=str(path))


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "not a readable"),
])
@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".ckpt"])
def test_bad_files(tmp_path, make, match, ext):
    path = tmp_path / f"bad{ext}"
    make(path)
    m = fz.create_model("resnet18")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        fz.load_checkpoint(m, path)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt", ".pt"])
def test_truncated_files(tmp_path, trained, ext):
    path = tmp_path / f"t{ext}"
    fz.save_checkpoint(trained, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        fz.load_checkpoint(fz.create_model("resnet18"), path)


def test_save_from_feature_model_loads_back(tmp_path, trained):
    feat = fz.create_model("resnet18", features_only=True)
    fz.load_checkpoint(feat, trained.state_dict())
    path = fz.save_checkpoint(feat, tmp_path / "backbone.safetensors")
    again = fz.create_model("resnet18", features_only=True, checkpoint_path=str(path))
    assert _same(again, trained)
    full = fz.create_model("resnet18")
    report = fz.load_checkpoint(full, path)
    assert set(report.missing) == {"classifier.weight", "classifier.bias"}
    assert _same(full, feat)


def test_unknown_extension(tmp_path):
    path = tmp_path / "w.weird"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="valid: .ckpt"):
        fz.load_checkpoint(fz.create_model("resnet18"), path)


@pytest.mark.parametrize("ext", [".pt", ".ckpt", ".safetensors"])
def test_many_random_files_give_checkpoint_errors(tmp_path, ext):
    path = tmp_path / f"noise{ext}"
    for seed in range(40):
        rng = random.Random(seed)
        path.write_bytes(rng.randbytes(rng.randint(1, 3000)))
        with pytest.raises(CheckpointError):
            fz.checkpoint.read_state_dict(path)
