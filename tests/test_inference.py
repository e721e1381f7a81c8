"""The inference path (issue 13, items 1 and 2): ``fz.optimize_for_inference`` computes what the eager
model computes, for every model of the zoo, with BatchNorms folded where that is exact and nowhere else."""
import copy

import pytest
import torch
import torch.nn as nn

import featurezoo as fz
from featurezoo import build_model_with_cfg, create_model, register_model
from featurezoo.extract import build_feature_model
from featurezoo.freezing import probe_input_size
from featurezoo.inference import InferenceModel, bf16_support, hardware_report
from featurezoo.layers.linear import OneDnnLinear
from featurezoo.registry import model_module
from tests.zoo import HUGE_MODELS, zoo_models

RTOL = 1e-5  # of the largest magnitude of each output, float32 (the bound)


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> int:
    """Random BatchNorm statistics and affine terms, so that folding them is really tested."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                n += 1
    return n


def _outputs(out):
    return list(out.values()) if isinstance(out, dict) else list(out)


def _assert_close(name, ref, got, rtol=RTOL):
    ref, got = _outputs(ref), _outputs(got)
    assert len(ref) == len(got), name
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.shape == b.shape and b.dtype == torch.float32, f"{name} output {i}: {b.shape} {b.dtype}"
        scale = a.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= rtol * scale, f"{name} output {i}: max |fast - eager| = {err:.3g}, {err / scale:.3g} of max"


def _max_rel_err(ref, got):
    return max((a - b).abs().max().item() / a.abs().max().item() for a, b in zip(_outputs(ref), _outputs(got)))


def _one_ulp_moves(model, x, ref, draws=3):
    """How far eager float32's outputs move (relative to ``ref``, its outputs on ``x``) when each input
    value changes by about one ulp, for ``draws`` fixed random perturbations."""
    moves = []
    with torch.no_grad():
        for k in range(draws):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + k))
            moves.append(_max_rel_err(ref, model(x * (1 + 2.0 ** -23 * noise))))
    return moves


@pytest.mark.parametrize("name", sorted(set(zoo_models()) - HUGE_MODELS))
def test_every_model_matches_eager(name):
    """Each model of the zoo, built once, at its smallest size (64 px unless its size facts say
    otherwise), batch 1, random BatchNorm statistics: the inference path equals eager float32 within
    1e-5 of max, with every ``nn.Linear`` on oneDNN. Where float32 is not that exact (a deep net's
    rounding, which channels-last reorders), the same transformations in float64 must equal eager
    float64 within 1e-9 (plus what the net amplifies float64 rounding to), and the float32 difference
    stay within 1e-5 + 3x the net's float32 rounding effect (eager float32's distance from float64, or
    the largest change a one-ulp input change makes)."""
    gen = torch.Generator().manual_seed(0)
    model = create_model(name, features_only=True).eval()
    n_bn = _randomise_norms(model, gen)
    h, w = probe_input_size(model.default_cfg)
    x = torch.randn(1, model.default_cfg.input_size[0], h, w, generator=gen)
    with torch.no_grad():
        ref = model(x)
    # oneDNN linears forced (linear="auto" chooses them only where they time faster on the machine).
    fast = fz.optimize_for_inference(model, example_input=x[:1], linear="onednn")
    assert not any(type(m) is nn.Linear for m in fast.modules())
    assert fast.onednn_linears == sum(type(m) is OneDnnLinear for m in fast.modules())
    with torch.no_grad():
        got = fast(x)
    assert [tuple(t.shape) for t in _outputs(got)] == [tuple(t.shape) for t in _outputs(ref)]
    # Every BatchNorm is folded into its conv, kept (its input has another use) or re-parameterised away.
    left = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert left + len(fast.folded) == n_bn if not fast.reparameterized else left + len(fast.folded) <= n_bn
    assert not any(getattr(m, "deploy", True) is False for m in fast.modules() if hasattr(m, "reparameterize"))
    err = _max_rel_err(ref, got)
    if err > RTOL:
        # float32 is not 1e-5 exact here (channels-last and other kernels reorder a deep net's sums): the
        # transformations must then be exact in float64, and the float32 difference of the order of what
        # float32 rounding does to this net: eager float32's own distance from float64, or what a one-ulp
        # change of the input does to eager float32 (with random BatchNorm statistics some nets are chaotic
        # at float32: halonet_50t's output moves by up to 0.6 of its max for a one-ulp change of the input).
        ulp_moves = _one_ulp_moves(model, x, ref)
        model, x = model.double(), x.double()
        with torch.no_grad():
            exact = model(x)
            exact_err = _max_rel_err(exact, fz.optimize_for_inference(model, example_input=x[:1], linear="onednn")(x))
            eager_err = _max_rel_err(exact, ref)
        rounding = max(eager_err, *ulp_moves)
        # float64 rounds 2**-29 as finely as float32: a net that amplifies float32 rounding to eager_err
        # amplifies float64's to about eager_err * 2**-29 (seresnet152 at random BatchNorm: 0.75 -> 6e-9).
        assert exact_err <= 1e-9 + 10 * 2.0 ** -29 * rounding and err <= RTOL + 3 * rounding, (
            f"{name}: inference path {err:.3g} of max from eager float32 (eager itself {eager_err:.3g} from "
            f"float64, a one-ulp input change moves eager by up to {max(ulp_moves):.3g}), {exact_err:.3g} in float64")


def test_huge_models_hold_only_module_classes_tested_in_their_family():
    """The models above 150M parameters (tests/zoo.py HUGE_MODELS; mae_h alone took 8 minutes above) are
    wider or deeper versions of models tested above: every module class they hold (read on the meta
    device) also occurs in a tested model of their family, so each folding / re-parameterising case is
    exercised there."""
    tested_classes = {}
    families = {model_module(n) for n in HUGE_MODELS}
    for name in sorted(n for n in set(zoo_models()) - HUGE_MODELS if model_module(n) in families):
        with torch.device("meta"):
            classes = {type(m) for m in create_model(name, features_only=True).modules()}
        tested_classes.setdefault(model_module(name), set()).update(classes)
    for name in sorted(HUGE_MODELS):
        with torch.device("meta"):
            classes = {type(m) for m in create_model(name, features_only=True).modules()}
        missing = classes - tested_classes.get(model_module(name), set())
        assert not missing, f"{name}: {sorted(c.__name__ for c in missing)} occur in no tested {model_module(name)} model"


# -- where folding must not happen --------------------------------------------------------------------------
class _ConvBnResidual(nn.Module):
    """conv -> bn, and the conv's output also added back: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return [self.bn(y) + y, self.bn2(self.conv2(x))]


def test_fold_only_where_the_conv_output_has_no_other_use():
    model = _ConvBnResidual().eval()
    _randomise_norms(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 8, 8)
    fast = fz.optimize_for_inference(model)
    assert fast.folded == [("conv2", "bn2")]
    assert isinstance(fast.model.bn, nn.BatchNorm2d) and isinstance(fast.model.bn2, nn.Identity)
    with torch.no_grad():
        _assert_close("residual", model(x), fast(x))


class _SeqNet(nn.Module):
    """The guide's scenario 2, with a feature on a conv that a BatchNorm follows."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5))
        self.feature_info = [dict(chs=8, reduction=2, name="layers.0"), dict(chs=16, reduction=4, name="layers.6")]
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.layers(x).mean((2, 3)))


@register_model
def _inference_seqnet(pretrained: bool = False, **kwargs):
    return build_model_with_cfg(_SeqNet, pretrained, default_cfg={"classifier": "head"}, **kwargs)


def test_a_returned_feature_is_never_folded_away():
    """layers.0 (a conv) is an output: its BatchNorm stays; layers.3 -> layers.4 folds; Dropout goes."""
    model = create_model("_inference_seqnet", features_only=True, as_dict=True).eval()
    _randomise_norms(model, torch.Generator().manual_seed(2))
    fast = fz.optimize_for_inference(model)
    assert fast.folded == [("layers.3", "layers.4")]
    kinds = [type(m).__name__ for m in fast.model.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Identity", "ReLU", "Identity"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref, got = model(x), fast(x)
    assert list(got) == ["layers.0", "layers.6"]
    _assert_close("seqnet", ref, got)


# -- the API -----------------------------------------------------------------------------------------------
def test_the_given_model_is_not_changed_and_metadata_reads_through():
    model = create_model("resnet18", features_only=True, out_indices=[2, 4])
    before = copy.deepcopy(model.state_dict())
    fast = fz.optimize_for_inference(model)
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(fast, InferenceModel) and not fast.training
    assert fast.out_channels == [128, 512] and fast.feature_info.reduction() == [8, 32]
    assert len(fast.folded) == 20 and fast.channels_last  # resnet18: every BatchNorm follows a conv
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(ValueError, match="eval mode only"):
        fast.train()


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float16"), "dtype='float16' is not supported; valid: \\['float32', 'bfloat16'\\]"),
    (dict(channels_last="yes"), "channels_last='yes'; valid"),
    (dict(compile=1), "compile must be True or False"),
    (dict(linear="mkl"), "linear='mkl'; valid: \\['auto', 'onednn', 'aten'\\]"),
])
def test_user_mistakes_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fz.optimize_for_inference(_ConvBnResidual(), **kwargs)


def test_bfloat16_needs_the_hardware_or_says_what_is_missing():
    ok, why = bf16_support("cpu")
    assert hardware_report()["cpu_bf16"] is ok
    model = _ConvBnResidual().eval()
    if ok:
        assert fz.optimize_for_inference(model, dtype="bfloat16").dtype == torch.bfloat16
    else:
        assert "avx512_bf16" in why
        with pytest.raises(ValueError, match="needs bfloat16 hardware on cpu.*avx512_bf16 and amx_bf16"):
            fz.optimize_for_inference(model, dtype="bfloat16")


def test_bfloat16_outputs_are_float32_and_near_float32():
    model = create_model("resnet18", features_only=True, out_indices=[1, 4]).eval()
    fast = fz.optimize_for_inference(model, dtype=torch.bfloat16, allow_emulated_bf16=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = model(x), fast(x)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation).
    _assert_close("resnet18 bf16", ref, got, rtol=5e-2)
    assert max((a - b).abs().max().item() for a, b in zip(ref, got)) > 0  # it did run in bfloat16


def test_extraction_builds_the_inference_path_unless_eager():
    fast = build_feature_model("_inference_seqnet", [0, 1])
    eager = build_feature_model("_inference_seqnet", [0, 1], eager=True)
    assert isinstance(fast, InferenceModel) and fast.folded == [("layers.3", "layers.4")]
    assert not isinstance(eager, InferenceModel) and not eager.training
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        _assert_close("seqnet", eager(x), fast(x))


# -- oneDNN linears ---------------------------------------------------------------------------------------
class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 8, bias=False)

    def forward(self, x):
        return [self.fc2(torch.relu(self.fc1(x)))]


def test_onednn_linears_compute_f_linear_and_fall_back_where_they_cannot():
    torch.manual_seed(0)
    model = _TwoLinears().eval()
    fast = fz.optimize_for_inference(model, linear="onednn", example_input=torch.randn(1, 24))
    assert fast.onednn_linears == 2 and type(fast.model.fc1) is OneDnnLinear and type(model.fc1) is nn.Linear
    # Same parameters under the same names: a checkpoint loads into either.
    assert fast.model.state_dict().keys() == model.state_dict().keys()
    for shape in [(5, 24), (2, 7, 24), (2, 3, 4, 24)]:
        x = torch.randn(*shape, dtype=torch.float64).float()
        with torch.no_grad():
            _assert_close(f"linears {shape}", model(x), fast(x), rtol=2e-6)
            exact = model.double()(x.double())[0]
            model.float()
        # Within float32 rounding of the exact product (float32 F.linear's own distance is ~1e-7 of max).
        assert (fast(x)[0].double() - exact).abs().max() <= 1e-6 * exact.abs().max()
    fc = copy.deepcopy(fast.model.fc1)
    x = torch.randn(3, 24)
    # Where oneDNN cannot give the float32 result, it is F.linear: float64, autocast, autograd, 1-D, empty.
    fc64 = copy.deepcopy(fc).double()
    assert type(fc64) is OneDnnLinear
    assert torch.equal(fc64(x.double()), torch.nn.functional.linear(x.double(), fc64.weight, fc64.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fc(x).dtype == torch.bfloat16
    fc.requires_grad_(True)
    y = fc(x)
    y.sum().backward()
    assert torch.allclose(fc.weight.grad, torch.ones(40, 1) * x.sum(0), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert fc(torch.randn(24)).shape == (40,) and fc(torch.randn(0, 24)).shape == (0, 40)
        xt = torch.randn(24, 6).t()  # not contiguous
        _assert_close("transposed input", [torch.nn.functional.linear(xt, fc.weight, fc.bias)], [fc(xt)], rtol=2e-6)


def test_linear_auto_times_once_and_aten_keeps_plain_linears():
    from featurezoo.layers.linear import onednn_linear_faster
    choice = onednn_linear_faster()
    assert isinstance(choice, bool) and onednn_linear_faster() is choice  # cached per process
    assert hardware_report()["cpu_linear"] == ("onednn" if choice else "aten")
    model = _TwoLinears().eval()
    auto = fz.optimize_for_inference(model, example_input=torch.randn(1, 24))
    assert auto.onednn_linears == (2 if choice else 0)
    plain = fz.optimize_for_inference(model, linear="aten", example_input=torch.randn(1, 24))
    assert plain.onednn_linears == 0 and type(plain.model.fc1) is nn.Linear
    # bfloat16 runs under autocast: the linears stay plain.
    bf16 = fz.optimize_for_inference(model, linear="onednn", dtype="bfloat16", allow_emulated_bf16=True,
                                     example_input=torch.randn(1, 24))
    assert bf16.onednn_linears == 0


def test_swin_attention_fuses_q_k_v_into_one_layer():
    from featurezoo.layers.windows import project_qkv
    from featurezoo.models.swin import WindowAttention
    from featurezoo.models.swinv2 import WindowCosineAttention
    torch.manual_seed(0)
    for attn in (WindowAttention(32, 4, 2), WindowCosineAttention(32, 4, 2)):
        x = torch.randn(2, 3, 16, 32)
        with torch.no_grad():
            before = project_qkv(x, attn, 2)
            attn.reparameterize()
            after = project_qkv(x, attn, 2)
        assert not hasattr(attn, "q") and attn.qkv.weight.shape == (96, 32)
        for a, b in zip(before, after):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), type(attn).__name__


def test_bfloat16_runs_pvt_whose_position_embeddings_are_float16():
    """PVT keeps MindCV's float16 position embeddings; resampling them to another grid under CPU autocast
    raised "Unexpected floating ScalarType in at::autocast::prioritize" (bfloat16 error table) until the
    resampling ran outside autocast."""
    model = create_model("pvt_tiny", features_only=True).eval()
    assert model.pos_embed1.dtype == torch.float16
    fast = fz.optimize_for_inference(model, dtype="bfloat16", allow_emulated_bf16=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        _assert_close("pvt_tiny bf16", model(x), fast(x), rtol=5e-2)
