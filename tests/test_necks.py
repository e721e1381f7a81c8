"""featurezoo.necks.SimpleFeaturePyramid: ViTDet's learnable neck on a plain model's last block."""
import pytest
import torch
import torch.nn.functional as F

import featurezoo as fz
from featurezoo.necks import LayerNorm2d, SimpleFeaturePyramid


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
def test_shapes_strides_and_channels(hw):
    h, w = hw
    neck = SimpleFeaturePyramid(32, out_channels=24, top_block=True).eval()
    assert neck.strides == [4, 8, 16, 32, 64] and neck.out_channels == [24] * 5
    with torch.no_grad():
        outs = neck(torch.randn(2, 32, h, w))
    half = (h // 2, w // 2)
    assert [tuple(o.shape) for o in outs] == [
        (2, 24, 4 * h, 4 * w), (2, 24, 2 * h, 2 * w), (2, 24, h, w), (2, 24) + half,
        (2, 24, -(-half[0] // 2), -(-half[1] // 2))]
    # Without the top block: ViTDet's four scales; other scale factors change the strides.
    assert len(SimpleFeaturePyramid(32)(torch.randn(1, 32, h, w))) == 4
    assert SimpleFeaturePyramid(32, scale_factors=(2.0, 1.0), in_stride=14).strides == [7, 14]


def test_every_parameter_gets_a_gradient():
    neck = SimpleFeaturePyramid(32, out_channels=16, top_block=True)
    with torch.no_grad():  # LayerNorms that are not the identity
        for m in neck.modules():
            if isinstance(m, LayerNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    x = torch.randn(2, 32, 5, 6, requires_grad=True)
    sum(o.square().sum() for o in neck(x)).backward()
    for name, p in neck.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None
    # ViTDet's layout: x4 is deconv, LN, GELU, deconv (C -> C/2 -> C/4); x2 one deconv (C -> C/2).
    assert [type(m).__name__ for m in neck.stages[0][0]] == ["ConvTranspose2d", "LayerNorm2d", "GELU",
                                                            "ConvTranspose2d"]
    assert neck.stages[0][1].in_channels == 8 and neck.stages[1][1].in_channels == 16
    assert neck.stages[3][1].in_channels == 32


def test_layer_norm_is_over_channels():
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(2, 6, 3, 4)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)
    with pytest.raises(ValueError, match="scale factors"):
        SimpleFeaturePyramid(32, scale_factors=(3.0,))


def test_on_a_vit_backbone():
    """On the last block of vit_b_16_224 (entry -2; -1 is its parameter-free stride-32 level)."""
    backbone = fz.create_model("vit_b_16_224", features_only=True, out_indices=[-2]).eval()
    entry = backbone.feature_info[0]
    assert entry["name"] == "blocks.11" and entry["native"]
    neck = SimpleFeaturePyramid.from_feature_info(entry, out_channels=64, top_block=True).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        outs = neck(backbone(x))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 96 // s, 160 // s) for s in (4, 8, 16)] + [
        (1, 64, 3, 5), (1, 64, 2, 3)]
    assert neck.strides == [4, 8, 16, 32, 64]
    # On entry -1 (stride 32) the same neck arithmetic gives strides 8..64.
    with torch.device("meta"):
        coarse = fz.create_model("vit_b_16_224", features_only=True, out_indices=[-1])
    assert SimpleFeaturePyramid.from_feature_info(coarse.feature_info[0]).strides == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="takes one map"):
        neck([x, x])
