"""MAE checks beyond the generic contract and MindCV parity tests.

The fine-tuning models are featurezoo's ViT with average pooling and
``fc_norm``: their timm counterpart needs creation arguments
(``global_pool="avg", fc_norm=True``) a declared twin cannot carry, so the
pairing is checked here. The pre-training models MindCV cannot create (its
``default_cfgs`` lacks them); they are checked against MindCV's parameter
names and shapes (recorded by the reference script from MindCV's own builder),
against timm's ViT for the encoder (same function: exact GELU, eps 1e-6), and
for the decoder's shapes and MindCV's loss.
"""
import numpy as np
import pytest
import timm
import torch

import featurezoo as fz
from featurezoo.features import FeatureExtractWrapper
from featurezoo.models.mae import MAEForPretrain, sincos_pos_embed_2d
from featurezoo.models.vit import VisionTransformer
from tests.reference import load_meta
from tests.zoo import PARITY_EXCEPTIONS, ref_args

FINETUNE = {"mae_b_16_224_finetune": "vit_base_patch16_224", "mae_l_16_224_finetune": "vit_large_patch16_224",
            "mae_h_14_224_finetune": "vit_huge_patch14_224"}
PRETRAIN = ["mae_b_16_224_pretrain", "mae_l_16_224_pretrain", "mae_h_16_224_pretrain"]


def _randomise(model, seed=1):
    """Norms that are not the identity and weights of order one (GELU's tanh approximation shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.15)
    return model.eval()


def _tiny_pretrain():
    torch.manual_seed(0)
    return _randomise(MAEForPretrain(image_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=4,
                                     decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4))


# -- fine-tuning models ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, twin", sorted(FINETUNE.items()))
def test_finetune_is_timms_vit_with_avg_pool_and_fc_norm(name, twin):
    with torch.device("meta"):
        ours = fz.create_model(name)
        theirs = timm.create_model(twin, global_pool="avg", fc_norm=True, num_classes=1000)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert "fc_norm.weight" in shapes and "norm.weight" not in shapes
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)  # MindCV's mae.py; vit.py keeps 1e-7
    assert {m.approximate for m in ours.modules() if isinstance(m, torch.nn.GELU)} == {"tanh"}
    assert ours.global_pool == "avg"


def test_finetune_outputs_equal_timms_with_gelu_swapped():
    """Same weights, a ViT with avg pooling + fc_norm: with MindCV's tanh GELU made exact, logits and
    block features agree with timm's (the MAE fine-tuning computation at a small size)."""
    torch.manual_seed(0)
    kw = dict(patch_size=16, embed_dim=48, depth=3, num_heads=4, num_classes=10)
    ours = _randomise(VisionTransformer(image_size=64, global_pool="avg", norm_eps=1e-6, **kw))
    theirs = timm.create_model("vit_base_patch16_224", img_size=64, global_pool="avg", fc_norm=True,
                               **kw).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tanh_logits = ours(x)
        for m in ours.modules():
            if isinstance(m, torch.nn.GELU):
                m.approximate = "none"
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
        assert (tanh_logits - theirs(x)).abs().max() > 1e-4  # the difference is real
        native = [i for i, e in enumerate(ours.feature_info) if e["native"]]
        for a, b in zip(ours.forward_levels(x, native), theirs.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_patch14_has_no_derived_levels():
    info = fz.get_feature_info("mae_h_14_224_finetune")
    assert [e["name"] for e in info] == [f"blocks.{i}" for i in range(32)] and all(e["native"] for e in info)
    assert fz.get_feature_info("mae_h_14_224_finetune", out_indices="pyramid").module_name() == ["blocks.31"]
    pyr = fz.get_feature_info("mae_l_16_224_finetune", out_indices="pyramid")
    assert pyr.reduction() == [4, 8, 16, 32] and pyr.module_name()[2] == "blocks.23"


# -- pre-training models -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_has_mindcvs_parameters(name):
    """Names (MindSpore's gamma/beta are LayerNorm weight/bias), shapes and trainable count of MindCV's
    MAEForPretrain as its builder makes it; MindCV's own create_model fails, and parity says so."""
    assert name in PARITY_EXCEPTIONS
    meta = load_meta(name, **ref_args(name))
    assert meta["error"] and "KeyError" in meta["error"]
    mindcv = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v
              for k, v in meta["param_shapes"].items()}
    with torch.device("meta"):
        ours = fz.create_model(name)
    assert {k: list(v.shape) for k, v in ours.named_parameters()} == mindcv
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == meta["trainable_params"]
    frozen = {k for k, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}
    assert sum(p.numel() for p in ours.parameters()) == meta["total_params"]


def test_sincos_position_embedding_is_maes():
    """MAE's reference formula, written out in numpy float64 (meshgrid of (w, h): columns first)."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, g = 64, 5
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64)), axis=0)
    ref = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    ref = np.concatenate([np.zeros((1, dim)), ref], axis=0)
    ours = sincos_pos_embed_2d(dim, g)
    assert ours.dtype == torch.float32 and ours.shape == (1 + g * g, dim)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-7)
    assert not np.allclose(sincos_pos_embed_2d(dim, g, cls_token=False).numpy()[1], ref[1 + g])  # row-major


def test_pretrain_encoder_is_timms_vit():
    """The encoder (exact GELU, eps 1e-6: timm's defaults) given the same weights computes timm's
    vit_base_patch16_224 function: per-block features, and the normalised tokens without a mask."""
    ours = _tiny_pretrain()
    theirs = timm.create_model("vit_base_patch16_224", img_size=64, patch_size=16, embed_dim=48, depth=3,
                               num_heads=4, num_classes=0, dynamic_img_size=True).eval()
    encoder = {k: v for k, v in ours.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    assert set(encoder) == set(theirs.state_dict())
    theirs.load_state_dict(encoder)
    x = torch.randn(2, 3, 64, 64)
    native = [i for i, e in enumerate(ours.feature_info) if e["native"]]
    with torch.no_grad():
        tokens, ids_restore = ours.forward_features(x)
        torch.testing.assert_close(tokens, theirs.forward_features(x), rtol=1e-5, atol=1e-5)
        assert ids_restore is None
        for a, b in zip(ours.forward_levels(x, native), theirs.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pretrain_masking_decoder_and_loss():
    model = _tiny_pretrain()  # 4x4 patches, mask ratio 0.75: 4 visible
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16)
    visible = [[0, 5, 10, 15], [1, 2, 3, 4]]
    for b, keep in enumerate(visible):
        mask[b] = 1
        mask[b, keep] = 0
    with torch.no_grad():
        latent, ids_restore = model.forward_features(x, mask)
        assert latent.shape == (2, 1 + 4, 48)
        assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(16).expand(2, -1))
        # The visible patches alone (class token first) give the same tokens as the masked run.
        tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
        kept = torch.stack([tokens[b, visible[b]] for b in range(2)])
        seq = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), kept], dim=1)
        for blk in model.blocks:
            seq = blk(seq)
        torch.testing.assert_close(latent, model.norm(seq), rtol=1e-5, atol=1e-5)
        pred = model.forward_decoder(latent, ids_restore, (4, 4))
        assert pred.shape == (2, 16, 16 * 16 * 3)
        assert model(x).shape == (2, 16, 768)  # no mask: every patch predicted
        loss = model(x, mask)
        target = model.patchify(x)
        target = (target - target.mean(-1, keepdim=True)) / target.var(-1, keepdim=True, unbiased=False).sqrt()
        per_patch = (pred - target).pow(2).mean(-1)
        torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())
    assert torch.equal(model.unpatchify(model.patchify(x), (4, 4)), x)
    p = model.patchify(x)  # pixels ordered (row, column, channel) within a patch, as MindCV's patchify
    assert torch.equal(p[0, 1, :3], x[0, :, 0, 16]) and torch.equal(p[0, 4, 3:6], x[0, :, 16, 1])


def test_pretrain_features_are_the_encoders_and_drop_the_decoder():
    model = _tiny_pretrain()
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i, blk in enumerate(model.blocks)]
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    torch.manual_seed(0)
    feat = FeatureExtractWrapper(MAEForPretrain(image_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=4,
                                                decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4))
    weights = model.state_dict()
    feat.load_state_dict({k: weights[k] for k in feat.state_dict()})
    assert not any(k.startswith(("decoder_", "mask_token", "norm.")) for k in feat.state_dict())
    native = [i for i, e in enumerate(feat.feature_info) if e["native"]]
    with torch.no_grad():
        outs = feat.eval()(x)
        for block, i in enumerate(native):
            assert torch.equal(outs[i], seen[block][:, 1:].transpose(1, 2).reshape(1, 48, 4, 4))
        # Another, non-square size: the fixed embedding is resampled like a learned one.
        assert [tuple(o.shape[-2:]) for o in feat(torch.randn(1, 3, 48, 80))][-2:] == [(3, 5), (2, 3)]
    with torch.device("meta"):
        first = fz.create_model("mae_b_16_224_pretrain", features_only=True, out_indices=[0])
    assert not any(k.startswith("blocks.1.") for k in first.state_dict())
