"""PVTv2 checks beyond the generic contract and MindCV parity tests.

timm's ``pvt_v2_b*`` hold our parameters one for one but compute another
function in three places; with those swapped into timm's model (MindSpore's
``same`` padding in the patch embeddings, eps 1e-7 in the patch-embedding and
spatial-reduction LayerNorms, tanh GELU) its logits and stage outputs equal
ours, and each swap is shown to matter.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.layers.padding import same_pad
from featurezoo.layers.sr_attention import SpatialReductionAttention

NAME = "pvt_v2_b0"


def _randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name, chs", [("pvt_v2_b0", [32, 64, 160, 256]), ("pvt_v2_b2", [64, 128, 320, 512])])
def test_pyramid_is_the_four_stage_norms_and_agrees_with_timm(name, chs):
    info = fz.get_feature_info(name)
    assert info.channels() == chs and info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == [f"norm_list.{i}" for i in range(4)]
    with torch.device("meta"):
        assert fz.create_model(name, features_only=True, out_indices="pyramid").out_indices == [0, 1, 2, 3]
        theirs = timm.create_model(name, features_only=True, pretrained=False).feature_info
    assert theirs.channels() == chs and theirs.reduction() == info.reduction()


def test_mindcv_norm_eps_activation_and_same_padding():
    model = fz.create_model(NAME).eval()
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert {n for n, e in eps.items() if e == 1e-7} == (
        {f"patch_embed_list.{i}.norm" for i in range(4)}
        | {f"block_list.{i}.{j}.attn.norm" for i in range(3) for j in range(2)})
    assert all(e == 1e-6 for n, e in eps.items() if not n.endswith(".norm"))  # norm1, norm2, norm_list
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 8 and all(m.approximate == "tanh" for m in gelus)
    # 7x7 stride 4 pads 1 before and 2 after at 224 px; 3x3 stride 2 pads 0 and 1 (timm: 3/3 and 1/1).
    x = torch.randn(1, 3, 224, 224)
    proj = model.patch_embed_list[0].proj
    with torch.no_grad():
        ours = proj(x)
        # the same windows (the conv pads symmetrically and drops a leading row/column: rounding may differ)
        torch.testing.assert_close(ours, F.conv2d(F.pad(x, (1, 2, 1, 2)), proj.weight, proj.bias, 4),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, F.conv2d(x, proj.weight, proj.bias, 4, padding=3), atol=1e-3)
        y = torch.randn(1, 32, 56, 56)
        proj = model.patch_embed_list[1].proj
        torch.testing.assert_close(proj(y), F.conv2d(F.pad(y, (0, 1, 0, 1)), proj.weight, proj.bias, 2),
                                   rtol=1e-5, atol=1e-5)


def test_attention_is_mindcv_softmax_formula():
    """F.scaled_dot_product_attention computes MindCV's softmax(q k^T * head_dim^-0.5) v."""
    torch.manual_seed(0)
    attn = SpatialReductionAttention(40, num_heads=5, qkv_bias=True, sr_ratio=2).eval()
    with torch.no_grad():
        attn.norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 6 * 10, 40)
        b, n, c = x.shape
        q = attn.q(x).reshape(b, n, 5, 8).transpose(1, 2)
        kv_in = attn.norm(attn.sr(x.transpose(1, 2).reshape(b, c, 6, 10)).flatten(2).transpose(1, 2))
        k, v = attn.kv(kv_in).reshape(b, -1, 2, 5, 8).permute(2, 0, 3, 1, 4)
        assert k.shape[2] == 3 * 5  # 6x10 reduced by 2
        scores = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
        expected = attn.proj((scores @ v).transpose(1, 2).reshape(b, n, c))
        torch.testing.assert_close(attn(x, 6, 10), expected, rtol=1e-5, atol=1e-6)


def test_features_are_the_classifier_path_and_stop_early():
    torch.manual_seed(0)
    full = _randomise_norms(fz.create_model(NAME), seed=1)
    seen = {}
    for i in range(4):
        full.norm_list[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = full(x)
        feat = fz.create_model(NAME, features_only=True)
        feat.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
        outs = feat.eval()(x)
    for i, out in enumerate(outs):
        b, c, h, w = out.shape
        assert out.is_contiguous() and (h, w) == (56 // 2 ** i, 56 // 2 ** i)
        assert torch.equal(out, seen[i].transpose(1, 2).reshape(b, c, h, w)), f"level {i}"
    assert _rel_err(logits, full.head(seen[3].mean(1))) < 1e-6  # MindCV: the mean of the last stage's tokens

    first = fz.create_model(NAME, features_only=True, out_indices=[1])
    assert len(first.block_list) == len(first.patch_embed_list) == len(first.norm_list) == 2
    assert not hasattr(first, "head")
    fired = []
    first.norm_list[1].register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        (out,) = first.eval()(x)
    assert fired == [1] and out.shape == (2, 64, 28, 28)


@pytest.mark.parametrize("hw", [(96, 160), (97, 131)])
def test_other_sizes(hw):
    feat = fz.create_model(NAME, features_only=True, out_indices="pyramid").eval()
    with torch.no_grad():
        outs = feat(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, math.ceil(hw[0] / r), math.ceil(hw[1] / r)) for c, r in zip([32, 64, 160, 256], [4, 8, 16, 32])]


def _mindspore_same_padding(conv: nn.Conv2d) -> None:
    """timm's symmetric padding -> MindSpore's ``same`` (odd pixel after)."""
    conv.padding = (0, 0)

    def pad(module, args):
        (x,) = args
        (t, b), (l, r) = (same_pad(x.shape[-2 + i], module.kernel_size[i], module.stride[i]) for i in range(2))
        return (F.pad(x, (l, r, t, b)),)

    conv.register_forward_pre_hook(pad)


def _timm_pair(swaps):
    torch.manual_seed(0)
    theirs = _randomise_norms(timm.create_model(NAME, pretrained=False), seed=2)
    ours = fz.create_model(NAME).eval()
    report = fz.load_checkpoint(ours, theirs.state_dict())
    assert not report.missing and not report.unexpected
    embeds = [theirs.patch_embed] + [s.downsample for s in theirs.stages[1:]]
    if "padding" in swaps:
        for e in embeds:
            _mindspore_same_padding(e.proj)
    if "eps" in swaps:
        for e in embeds:
            e.norm.eps = 1e-7
        for m in theirs.modules():
            if m.__class__.__name__ == "Attention" and m.norm is not None:
                m.norm.eps = 1e-7
    if "gelu" in swaps:
        for m in theirs.modules():
            if hasattr(m, "act") and isinstance(m.act, nn.GELU):
                m.act = nn.GELU(approximate="tanh")
    return ours, theirs


SWAPS = ("padding", "eps", "gelu")


def test_timm_twin_computes_ours_with_the_three_differences_swapped():
    ours, theirs = _timm_pair(SWAPS)
    x = torch.randn(2, 3, 64, 64)  # stage maps 16, 8, 4 are multiples of the reduction ratios 8, 4, 2
    with torch.no_grad():
        assert _rel_err(ours(x), theirs(x)) < 1e-6  # measured: 0 (the same float32 operations)
        mine = ours.forward_levels(x, [0, 1, 2, 3])
        timms = theirs.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(mine, timms):
        assert _rel_err(a, b) < 1e-6


@pytest.mark.parametrize("missing", SWAPS)
def test_each_difference_from_timm_matters(missing):
    ours, theirs = _timm_pair(tuple(s for s in SWAPS if s != missing))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # measured: padding 0.93, GELU 2.8e-5, eps 8e-6 (eps is small next to the variance of these inputs)
        assert _rel_err(ours(x), theirs(x)) > 2e-6, f"{missing} makes no difference"
