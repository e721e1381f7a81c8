"""Property-based tests over the public surface (hypothesis, derandomized, bounded in examples):
whatever a user passes, the answer is either a working result or the library's own error
(``ValueError``; ``CheckpointError`` is one) naming the culprit, and a failed load changes nothing.

Meta-device builds and forwards wherever no numbers are needed."""
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import featurezoo as fz
from featurezoo.checkpoint import CheckpointError
from featurezoo.registry import model_module
from tests.zoo import zoo_models

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def _full_info(name):
    return fz.get_feature_info(name)


# -- out_indices ---------------------------------------------------------------------------------

ENTRY = st.one_of(st.integers(-8, 8), st.booleans(), st.text(max_size=2), st.floats(-2, 2), st.none())
OUT_INDICES = st.one_of(st.none(), st.just("pyramid"), st.text(max_size=4), st.integers(-3, 3),
                        st.lists(ENTRY, max_size=5), st.lists(st.integers(-8, 8), min_size=1, max_size=5))


@settings(max_examples=30, **SETTINGS)
@given(name=st.sampled_from(["resnet18", "mobilenet_v3_small_100"]), out_indices=OUT_INDICES)
def test_out_indices_select_entries_or_name_the_mistake(name, out_indices):
    chs = [e["chs"] for e in _full_info(name)]
    n = len(chs)
    try:
        model = fz.build_on_meta(name, features_only=True, out_indices=out_indices)
    except ValueError as err:
        assert "out_indices" in str(err), err
        valid = (isinstance(out_indices, list) and out_indices
                 and all(type(i) is int and -n <= i < n for i in out_indices)
                 and len({i % n for i in out_indices}) == len(out_indices))
        assert not valid and out_indices is not None and out_indices != "pyramid", (out_indices, err)
        return
    if out_indices is None:
        assert model.out_channels == chs
    elif out_indices != "pyramid":
        assert model.out_channels == [chs[i % n] for i in out_indices]


# -- builder arguments ---------------------------------------------------------------------------

VALUES = st.one_of(st.integers(-3, 6), st.booleans(), st.floats(-1, 2, allow_nan=False), st.text(max_size=3),
                   st.none())
ARGS = st.dictionaries(st.sampled_from(["num_classes", "in_channels", "drop_rate", "features_only", "pretrained",
                                        "out_indice", "num_class", "in_chans", "as_dict"]),
                       VALUES, max_size=3)


@settings(max_examples=80, **SETTINGS)
@given(args=ARGS)
def test_builder_arguments_build_or_name_the_argument(args):
    args = {k: v for k, v in args.items() if not (k == "pretrained" and v is True)}  # no download here
    try:
        with torch.device("meta"):
            model = fz.create_model("resnet18", **args)
    except ValueError as err:
        # create_model drops None values of the keywords it passes on, not of its own parameters
        given_keys = [k for k, v in args.items() if v is not None or k in CREATE_MODEL_PARAMS]
        assert any(repr(k)[1:-1] in str(err) for k in given_keys), (args, err)
        return
    in_chs = args.get("in_channels", 3)
    assert type(in_chs) is int and in_chs > 0 and model.conv1.in_channels == in_chs
    if not args.get("features_only"):
        assert model.classifier.out_features == args.get("num_classes", 1000)


CREATE_MODEL_PARAMS = ("num_classes", "in_channels", "pretrained", "features_only")


# -- input sizes and dtypes, every family --------------------------------------------------------


# One model per kind of size behaviour (a meta build and forward of all 52 families costs over 140 s
# here; tests/test_contract.py runs every model at 64x64 and 67x83): plain convnets, a side rule with
# unpadded layers (NASNet), a minimum (Inception), side rules (HaloNet, RepMLP), one fixed size
# (MLP-Mixer), resampled tokens (ViT, PVT with float16 position embeddings), windows (Swin), a fixed
# token grid (CrossViT), models computing their own levels (HRNet), depthwise stacks (EfficientNet).
SIZE_FAMILIES = ["resnet18", "nasnet_a_4x1056", "inception_v3", "halonet_50t", "repmlp_t224", "mlp_mixer_b_p16",
                 "vit_b_32_224", "pvt_tiny", "swin_tiny", "crossvit_9", "hrnet_w32", "efficientnet_b0"]


def test_size_families_cover_every_family_with_a_side_rule():
    with_rule = {model_module(n) for n in zoo_models() if fz.get_model_cfg(n).side_rules}
    # PNASNet shares NASNet's rule (tests/test_regnet_vgg_nas.py checks both).
    assert with_rule - {"pnasnet"} <= {model_module(n) for n in SIZE_FAMILIES}


@functools.lru_cache(maxsize=None)
def _meta_backbone(name):
    return fz.build_on_meta(name, features_only=True).eval()


@settings(max_examples=30, **SETTINGS)
@given(name=st.sampled_from(SIZE_FAMILIES), h=st.integers(64, 300), w=st.integers(64, 300),
       dtype=st.sampled_from([torch.float32] * 4 + [torch.float16, torch.float64, torch.int64]))
def test_every_family_takes_an_input_or_refuses_it_by_name(name, h, w, dtype):
    model = _meta_backbone(name)
    cfg = fz.get_model_cfg(name)
    if cfg.input_sides and not cfg.side_rules:  # the classifier-sized models (MLP-Mixer): their one size
        h = w = cfg.input_sides[0]
    x = torch.empty(2, 3, h, w, device="meta", dtype=dtype)
    try:
        feats = model(x)
    except ValueError as err:
        assert name in str(err) or model.model_name in str(err), err
        assert dtype != torch.float32 or cfg.side_rules or cfg.min_input_size, (name, h, w, err)
        return
    assert dtype == torch.float32
    assert [f.shape[:2] for f in feats] == [(2, c) for c in model.out_channels]
    for f, entry in zip(feats, model.feature_info):
        if "grid" not in entry and not cfg.valid_padding:
            assert tuple(f.shape[2:]) == (math.ceil(h / entry["reduction"]), math.ceil(w / entry["reduction"]))


# -- state dicts ---------------------------------------------------------------------------------

MUTATIONS = ["meta", "sparse", "quantized", "bool", "int64", "float16", "float64", "shape", "int_key", "tuple_key",
             "missing", "extra", "non_contiguous"]
# Mutations the loader takes (converting the dtype); every other one is an error naming the key,
# except a classifier tensor of another shape or missing: the head keeps its own (another num_classes).
LOADABLE = {"float16", "float64", "non_contiguous"}
HEAD_KEEPS_ITS_OWN = {"shape", "missing"}


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(0)
    return fz.create_model("squeezenet1_0")


def _mutate(state, key, how):
    t = state[key]
    if how == "meta":
        state[key] = torch.empty_like(t, device="meta")
    elif how == "sparse":
        state[key] = t.to_sparse()
    elif how == "quantized":
        state[key] = torch.quantize_per_tensor(t, 0.05, 0, torch.qint8)
    elif how in ("bool", "int64", "float16", "float64"):
        state[key] = (t > 0) if how == "bool" else t.to(getattr(torch, how))
    elif how == "shape":
        state[key] = torch.cat([t, t[:1]])
    elif how == "int_key":
        state[len(state)] = state.pop(key)
        return len(state) - 1
    elif how == "tuple_key":
        state[(key,)] = state.pop(key)
        return (key,)
    elif how == "missing":
        del state[key]
    elif how == "extra":
        state[key + "_extra"] = t.clone()
        return key + "_extra"
    elif how == "non_contiguous":
        state[key] = t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t[::1]
    return key


@settings(max_examples=50, **SETTINGS)
@given(position=st.integers(0, 10_000), how=st.sampled_from(MUTATIONS), seed=st.integers(0, 2 ** 16))
def test_a_mutated_state_dict_loads_or_names_the_key_and_changes_nothing(squeezenet, position, how, seed):
    own = squeezenet.state_dict()
    keys = list(own)
    key = keys[position % len(keys)]
    gen = torch.Generator().manual_seed(seed)
    checkpoint = {k: torch.randn(v.shape, generator=gen) for k, v in own.items()}
    culprit = _mutate(checkpoint, key, how)
    before = {k: v.clone() for k, v in own.items()}
    head = key.startswith(fz.get_model_cfg("squeezenet1_0").classifier + ".")
    try:
        fz.load_checkpoint(squeezenet, checkpoint)
    except CheckpointError as err:
        assert how not in LOADABLE, err
        named = culprit if isinstance(culprit, str) else repr(culprit)
        assert named in str(err), (how, culprit, err)
        after = squeezenet.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), f"{how} at {key}: the model changed"
        return
    after = squeezenet.state_dict()
    if head and how in HEAD_KEEPS_ITS_OWN:
        assert torch.equal(after[key], before[key])
        assert all(torch.equal(after[k], checkpoint[k]) for k in keys if k != key)
        return
    assert how in LOADABLE
    assert all(torch.equal(after[k], checkpoint[k].to(after[k].dtype)) for k in keys)
