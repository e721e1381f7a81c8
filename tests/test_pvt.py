"""PVT (v1) checks beyond the generic contract and MindCV parity tests.

MindCV 0.3.0's PVT calls ``ops.ResizeBilinear``, which MindSpore 2.10 removed;
``tools/mindcv_reference.py`` provides it for these four models as a shim over
its documented replacement ``ops.ResizeBilinearV2`` and records a check of the
shim against the old op's documented semantics in each reference's
``meta.json``. The tests here require that record, and that the reference
gave the position embeddings and class token values (MindCV initialises them
to zero, which would hide how they are added).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.models.pvt import PyramidVisionTransformer
from tests.reference import load_meta
from tests.zoo import ref_args

NAME = "pvt_tiny"
NAMES = ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_ran_mindcv_with_the_checked_resize_shim(name):
    meta = load_meta(name, **ref_args(name))
    assert meta["error"] is None, meta["error"]
    assert meta["reference_patch"].startswith("ops.ResizeBilinear = ResizeBilinearShim")
    check = meta["resize_bilinear_shim_check"]
    assert check["ok"] and check["documented_example_max_abs_err"] <= 1e-5
    assert len(check["cases"]) >= 10 and all(c["max_abs_err"] <= c["tol"] for c in check["cases"])
    assert {(tuple(c["in"]), tuple(c["out"])) for c in check["cases"]} >= {((28, 28), (28, 28)), ((7, 7), (7, 7))}
    assert check["control_half_pixel_centers_max_abs_err"] > 0.1  # the check tells the semantics apart
    assert sorted(meta["randomised_embeddings"]) == ["cls_token"] + [f"pos_embed{i}" for i in range(1, 5)]
    # Our float16 parameters are MindCV's.
    with torch.device("meta"):
        ours = {n for n, p in fz.create_model(name).named_parameters() if p.dtype == torch.float16}
    assert ours == set(meta["non_float32_params"]) == {f"pos_embed{i}" for i in range(1, 5)}


def test_pyramid_norm_eps_and_activation():
    info = fz.get_feature_info(NAME)
    assert info.channels() == [64, 128, 320, 512] and info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == [f"Blocks.{i}" for i in range(4)]
    with torch.device("meta"):
        model = fz.create_model(NAME)
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert all(eps[f"patch_embed{i}.norm"] == 1e-5 for i in range(1, 5)) and eps["norm"] == 1e-6
    assert all(e == {"norm1": 1e-5, "norm2": 1e-6, "norm": 1e-7}[n.rsplit(".", 1)[-1]]
               for n, e in eps.items() if n.startswith("Blocks."))
    assert sum(n.endswith("attn.norm") for n in eps) == 6  # stages 1-3 reduce keys; stage 4 does not
    assert all(m.approximate == "tanh" for m in model.modules() if isinstance(m, nn.GELU))
    assert [tuple(getattr(model, f"pos_embed{i}").shape) for i in range(1, 5)] == [
        (1, 3136, 64), (1, 784, 128), (1, 196, 320), (1, 50, 512)]


def _small_random(seed: int = 0) -> PyramidVisionTransformer:
    torch.manual_seed(seed)
    model = PyramidVisionTransformer(depths=(1, 1, 1, 1), num_classes=10).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("pos_embed", "cls_token")):
                p.copy_(torch.randn(p.shape) * 0.5)
            elif "norm" in n:
                p.copy_(torch.rand(p.shape) + 0.5 if n.endswith("weight") else torch.randn(p.shape) * 0.2)
    return model


def test_float16_embeddings_are_added_in_float32():
    model = _small_random()
    seen = []
    model.Blocks[0][0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
        tokens, _, _ = model.patch_embed1(x)
    assert model.pos_embed1.dtype == torch.float16 and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], tokens + model.pos_embed1.float())


def test_features_are_the_classifier_path_and_stop_early():
    model = _small_random()
    seen = {}
    for i in range(4):
        model.Blocks[i][-1].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, model.head(model.norm(seen[3])[:, 0]))  # the class token
        outs = model.forward_levels(x, [0, 1, 2, 3])
    for i, out in enumerate(outs):
        b, c, h, w = out.shape
        tokens = seen[i][:, 1:] if i == 3 else seen[i]
        assert out.is_contiguous() and (h, w) == (56 >> i, 56 >> i)
        assert torch.equal(out, tokens.transpose(1, 2).reshape(b, c, h, w)), f"level {i}"

    feat = fz.create_model(NAME, features_only=True, out_indices=[0])
    kept = {n for n, _ in feat.named_parameters()}
    assert "pos_embed1" in kept and not kept & {"pos_embed2", "cls_token", "norm.weight", "head.weight"}
    assert len(feat.Blocks) == 1 and not hasattr(feat, "patch_embed2")
    with torch.no_grad():
        (out,) = feat.eval()(x)
    assert out.shape == (2, 64, 56, 56)


def test_native_size_is_not_resampled_and_other_sizes_are(monkeypatch):
    model = _small_random()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        native = model.forward_levels(x, [3])[0]
        calls = []
        real = F.interpolate
        monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k.get("mode")) or real(*a, **k))
        assert torch.equal(model.forward_levels(x, [3])[0], native) and calls == []
        model.forward_levels(torch.randn(1, 3, 96, 128), [3])
    assert calls == ["bicubic"] * 4


@pytest.mark.parametrize("hw", [(96, 160), (97, 131)])
def test_other_sizes(hw):
    feat = fz.create_model(NAME, features_only=True, out_indices="pyramid").eval()
    with torch.no_grad():
        outs = feat(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, math.ceil(hw[0] / r), math.ceil(hw[1] / r)) for c, r in zip([64, 128, 320, 512], [4, 8, 16, 32])]
