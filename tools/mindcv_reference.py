#!/usr/bin/env python
"""Produce cached MindCV reference outputs for featurezoo's parity tests.

This script runs ONLY under the MindCV venv (mindspore + mindcv + numpy); our
PyTorch tests never import it -- they read its output through
``tests/reference.py``.

For every job ``{"model": NAME, "size": PX, "batch": B}`` it builds the MindCV
model with a full 1000-class classifier, randomises all normalisation layers
(so that BatchNorm/LayerNorm are not the identity), runs it in eval mode on a
fixed random input and writes::

    CACHE/mindcv-<mindcv ver>-ms-<mindspore ver>/<model>-<size>px-b<batch>-s<seed>/
        meta.json     # always written last (directory is renamed into place)
        model.ckpt    # mindspore.save_checkpoint of the randomised network, if under 50 MB
        weights.npz   # the parameters under 65536 elements, exactly (larger ones: a recipe in meta.json)
        outputs.npz   # input, logits[, feat_0, feat_1, ...]

Large trainable parameters are synthesised from a recipe (tools/synth_weights.py) before the forward pass, so the tests
rebuild any model's checkpoint from ``meta.json`` and ``weights.npz``: the cache no longer holds 50 GB of
checkpoints of the large models.

A model that cannot be built/run gets a directory holding only ``meta.json``
with ``error`` set, so tests can report the MindCV failure explicitly.

Usage::

    python tools/mindcv_reference.py --out CACHE --jobs jobs.json
    python tools/mindcv_reference.py --out CACHE --model resnet50 --size 224
    python tools/mindcv_reference.py --list-mindcv-models
    python tools/mindcv_reference.py --param-counts counts.json --model vit_l_16_224 ...
"""

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")  # silence MindSpore's C++ INFO/WARNING logging
# MindSpore hands oneDNN its convolutions in plain NCHW layout. On AVX-512 CPUs oneDNN 3.10 then picks
# "jit_uni_ncsp:conv+ref", a reference kernel at 0.5-0.9 GFLOP/s (VGG-19 at 224 px took 142 s); capped at AVX2 it
# picks a JIT kernel at ~43 GFLOP/s. Outputs move by ~1e-6 of max, far inside the parity tolerance. A cap, so
# machines without AVX-512 are unaffected; set ONEDNN_MAX_CPU_ISA yourself to override.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import numpy as np  # noqa: E402

from synth_weights import KEEP_CKPT_BYTES, needs_recipe, recipe_of, synthesise  # noqa: E402  (tools/, beside us)

import mindspore  # noqa: E402
import mindspore.common.initializer as ms_init  # noqa: E402
import mindcv  # noqa: E402
from mindcv.models.features import FeatureExtractWrapper  # noqa: E402
from mindcv.models import registry as mindcv_registry  # noqa: E402

# Bump whenever the content/format of a reference changes: existing
# references with another format_version are recomputed (and rejected by
# tests/reference.py).
FORMAT_VERSION = 3  # 2: layer-scale gammas randomised too; 3: large parameters synthesised, weights.npz
DEFAULT_SEED = 0
DEFAULT_BATCH = 2
NUM_CLASSES = 1000


# --------------------------------------------------------------------------- paths


def version_dir(out_root):
    return Path(out_root) / f"mindcv-{mindcv.__version__}-ms-{mindspore.__version__}"


def job_dirname(model, size, batch, seed, bn="random"):
    # "calibrated" BN statistics get their own reference (see calibrate_batchnorm).
    return f"{model}-{size}px-b{batch}-s{seed}" + ("-bncal" if bn == "calibrated" else "")


def job_dir(out_root, job):
    return version_dir(out_root) / job_dirname(job["model"], int(job["size"]), int(job["batch"]), int(job["seed"]),
                                               job.get("bn", "random"))


def read_complete_meta(path):
    """Return meta.json of a finished reference dir of the current format, else None."""
    meta_path = Path(path) / "meta.json"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta


# --------------------------------------------------------------------------- helpers


class _EagerInitializer:
    """Make ``mindspore.common.initializer.initializer`` return materialised tensors.

    Some MindCV models (rexnet) do ``initializer(...).reshape(...)`` which fails
    on a lazy tensor; materialising immediately is harmless because we need all
    data anyway.
    """

    def __enter__(self):
        self._orig = ms_init.initializer
        orig = self._orig

        def eager_initializer(*args, **kwargs):
            t = orig(*args, **kwargs)
            if getattr(t, "init", None) is not None:
                t = t.init_data()
            return t

        ms_init.initializer = eager_initializer
        return self

    def __exit__(self, *exc):
        ms_init.initializer = self._orig
        return False


def seed_everything(seed):
    mindspore.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def create_model(name, **kwargs):
    with _EagerInitializer():
        return mindcv.models.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def materialise(net):
    for p in net.get_parameters():
        if p.has_init:
            p.init_data()


def json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


def format_exception(e):
    msg = str(e)
    # MindSpore appends a long C++ call stack section; keep the useful part.
    cut = msg.find("\n----------------------------------------------------\n- C++ Call Stack")
    if cut >= 0:
        msg = msg[:cut]
    # ...and frames its messages with rows of dashes.
    msg = "\n".join(line for line in msg.splitlines() if line.strip("- ")).strip()
    if len(msg) > 4000:
        msg = msg[:4000] + " ...[truncated]"
    return f"{type(e).__name__}: {msg}"


def default_cfg_for(name):
    """MindCV's default_cfgs entry for ``name`` (from the model's module)."""
    cfg = None
    try:
        fn = mindcv_registry.model_entrypoint(name)
        mod = sys.modules[fn.__module__]
        cfg = getattr(mod, "default_cfgs", {}).get(name)
    except Exception:
        cfg = None
    if cfg is None:
        cfg = mindcv_registry.get_pretrained_cfg(name) or None
    return json_safe(dict(cfg)) if cfg is not None else None


def _param(cell, attr):
    p = getattr(cell, attr, None)
    return p if isinstance(p, mindspore.Parameter) else None


def _set(p, arr):
    p.set_data(mindspore.Tensor(arr.astype(np.float32), dtype=p.dtype))


def randomise_norms(net, rng):
    """Randomise every BatchNorm (affine + running stats) and every other cell with
    ``gamma``/``beta`` parameters (LayerNorm, GroupNorm, InstanceNorm, GRN...)."""
    counts = {"batchnorm": 0, "affine_norm": 0}
    classes = set()
    for _, cell in net.cells_and_names():
        mean, var = _param(cell, "moving_mean"), _param(cell, "moving_variance")
        gamma, beta = _param(cell, "gamma"), _param(cell, "beta")
        if mean is not None and var is not None:
            if gamma is not None:
                _set(gamma, rng.uniform(0.5, 1.5, gamma.shape))
            if beta is not None:
                _set(beta, rng.normal(0.0, 0.2, beta.shape))
            _set(mean, rng.normal(0.0, 0.2, mean.shape))
            _set(var, rng.uniform(0.5, 1.5, var.shape))
            counts["batchnorm"] += 1
            classes.add(type(cell).__name__)
        elif gamma is not None and beta is not None:
            _set(gamma, rng.uniform(0.5, 1.5, gamma.shape))
            _set(beta, rng.normal(0.0, 0.2, beta.shape))
            counts["affine_norm"] += 1
            classes.add(type(cell).__name__)
    # Layer scale (convnext/vit/cait/xcit `gamma`, `gamma_1`...) starts near 1e-6, which would hide
    # whole residual branches from a parity check; give it values of order one.
    norm_params = set()
    for _, cell in net.cells_and_names():
        if _param(cell, "beta") is not None or _param(cell, "moving_mean") is not None:
            norm_params.update(id(p) for p in (_param(cell, "gamma"), _param(cell, "beta")) if p is not None)
    counts["layer_scale"] = 0
    # PoolFormer's layer scales are `layer_scale_1/2` (no other MindCV 0.3.0 model has a parameter so named).
    for name, p in net.parameters_and_names():
        if name.rsplit(".", 1)[-1].startswith(("gamma", "layer_scale")) and id(p) not in norm_params:
            _set(p, rng.uniform(0.2, 1.0, p.shape))
            counts["layer_scale"] += 1
    counts["classes"] = sorted(classes)
    return counts


def synthesise_large_params(net, seed):
    """Replace every large trainable float32 parameter by values its recipe regenerates (tools/synth_weights.py):
    uniform, with the mean, std and range of the randomised values. Returns {name: recipe}. Frozen parameters
    (Swin's attention masks and one-hot relative-position indices) are structure, which our models compute
    rather than load: they keep their values."""
    recipes = {}
    for name, p in net.parameters_dict().items():
        if p.requires_grad and needs_recipe(str(np.dtype(mindspore.dtype_to_nptype(p.dtype))), p.shape):
            recipe = recipe_of(p.asnumpy())
            p.set_data(mindspore.Tensor(synthesise(name, p.shape, recipe, seed), dtype=p.dtype))
            recipes[name] = recipe
    return recipes


def describe_weights(net, recipes):
    """The checkpoint's entries in its order ([name, dtype, shape, recipe or None]), the exact values of the
    small parameters, and the checkpoint's size in bytes."""
    entries, small, nbytes = [], {}, 0
    for name, p in net.parameters_dict().items():
        recipe = recipes.get(name)
        if recipe is None:
            value = small[name] = p.asnumpy()
            dtype, shape = value.dtype, value.shape
        else:  # synthesised: float32 by construction; no copy of a large parameter is needed
            dtype, shape = np.dtype(np.float32), tuple(int(d) for d in p.shape)
        nbytes += dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        entries.append([name, str(dtype), list(shape), recipe])
    return entries, small, nbytes


def calibrate_batchnorm(net, x):
    """Set every BatchNorm's moving statistics to the batch statistics of one
    training-mode pass on ``x`` (a separate batch of random images). Random statistics make activations grow through
    very deep residual stacks (resnest269 reaches logits ~1e7, where float32
    rounding alone exceeds the parity tolerance); calibrated ones keep each
    normalisation near unit scale while still not being the identity."""
    count = 0
    for _, cell in net.cells_and_names():
        if hasattr(cell, "bn_train") and hasattr(cell, "moving_mean"):
            # MindSpore's op keeps (1 - momentum) of the old statistic; momentum 1 keeps only the batch's.
            cell.bn_train = mindspore.ops.BatchNorm(is_training=True, epsilon=cell.eps, momentum=1.0,
                                                    data_format=cell.format)
            count += 1
    net.set_train(True)
    net(mindspore.Tensor(x))
    net.set_train(False)
    return count


def to_numpy_outputs(out):
    if isinstance(out, (tuple, list)):
        return [o.asnumpy() for o in out]
    return [out.asnumpy()]


def _module_mentions_features_only(name):
    try:
        import inspect

        mod = sys.modules[mindcv_registry.model_entrypoint(name).__module__]
        return "features_only" in inspect.getsource(mod)
    except Exception:
        return False


def build_feature_extractor(name, net):
    """Return (FeatureExtractWrapper sharing net's parameter values, feature_info) or (None, None)."""
    if hasattr(net, "feature_info"):
        fi = list(net.feature_info)
        return FeatureExtractWrapper(net, out_indices=list(range(len(fi)))), fi
    if not _module_mentions_features_only(name):
        return None, None
    # Models whose features_only variant is a different ("is_rewritten") class,
    # e.g. hrnet -> HRNetFeatures.  Build it and copy the randomised values by name.
    try:
        fnet = create_model(name, features_only=True, out_indices=list(range(64)))
    except RuntimeError as e:
        if "is not implemented" in str(e):
            return None, None
        raise
    inner = fnet.net if isinstance(fnet, FeatureExtractWrapper) else fnet
    if not hasattr(inner, "feature_info"):
        return None, None
    fi = list(inner.feature_info)
    wrapper = FeatureExtractWrapper(inner, out_indices=list(range(len(fi))))
    src = {p.name: p for p in net.get_parameters()}
    dst = list(wrapper.get_parameters())
    dst_names = {p.name for p in dst}
    missing = sorted(dst_names - set(src))
    if missing:
        raise RuntimeError(f"features_only net has parameters absent from the classifier net: {missing[:10]}")
    for p in dst:
        s = src[p.name]
        if tuple(s.shape) != tuple(p.shape):
            raise RuntimeError(f"shape mismatch for {p.name}: {tuple(s.shape)} vs {tuple(p.shape)}")
        p.set_data(mindspore.Tensor(s.asnumpy(), dtype=s.dtype))
    return wrapper, fi


# --------------------------------------------------------------------------- PVT (v1) only

# MindCV 0.3.0's pvt.py resizes position embeddings with ops.ResizeBilinear(size) (default flags
# align_corners=False, half_pixel_centers=False), an op MindSpore 2.10 no longer has: every PVT fails at
# stage 2 with an AttributeError. MindSpore's 2.0-2.2 documentation of that op says "This API is deprecated,
# please use mindspore.ops.ResizeBilinearV2 instead"; V2 has the same two flags and takes the size as an
# input. For these four models only, ops.ResizeBilinear is provided as that thin shim, after checking it
# against the old op's documented semantics (check_resize_bilinear_shim, recorded in meta.json). At 224 px
# MindCV's stages 2-4 "resize" 28x28 -> 28x28, 14 -> 14, 7 -> 7, which the check covers too.
PVT_V1 = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large")


class ResizeBilinearShim:
    """``ops.ResizeBilinear(size, align_corners, half_pixel_centers)`` of MindSpore < 2.3 on ResizeBilinearV2."""

    def __init__(self, size, align_corners=False, half_pixel_centers=False):
        self.size = tuple(int(s) for s in size)
        self._op = mindspore.ops.ResizeBilinearV2(align_corners=align_corners, half_pixel_centers=half_pixel_centers)

    def __call__(self, x):
        return self._op(x, self.size)


def _bilinear_by_hand(x, out_h, out_w):
    """The documented semantics of ops.ResizeBilinear with align_corners=False, half_pixel_centers=False:
    output pixel (i, j) samples the input at (i * in_h / out_h, j * in_w / out_w), clamped at the last
    row/column, by bilinear interpolation (numpy, float64)."""
    x = x.astype(np.float64)
    in_h, in_w = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        sy = i * in_h / out_h
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(out_w):
            sx = j * in_w / out_w
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = x[..., y0, x0] * (1 - fx) + x[..., y0, x1] * fx
            bottom = x[..., y1, x0] * (1 - fx) + x[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


def check_resize_bilinear_shim():
    """The shim against (a) the example output printed in MindSpore 2.0-2.2's documentation of the deprecated
    resize (nn.ResizeBilinear, same default flags: [[1,2,3,4],[5,6,7,8]] -> 5x5), (b) the hand computation above
    on random maps (up, down, non-square, identity sizes; float32 and float16, as PVT's embeddings are)."""
    documented = np.array([[1.0, 1.8, 2.6, 3.4, 4.0], [2.6, 3.4, 4.2, 5.0, 5.6], [4.2, 5.0, 5.8, 6.6, 7.2],
                           [5.0, 5.8, 6.6, 7.4, 8.0], [5.0, 5.8, 6.6, 7.4, 8.0]])
    example = np.arange(1, 9, dtype=np.float32).reshape(1, 1, 2, 4)
    got = ResizeBilinearShim((5, 5))(mindspore.Tensor(example)).asnumpy()[0, 0]
    result = {"documented_example_max_abs_err": float(np.abs(got - documented).max()), "cases": []}
    rng = np.random.RandomState(0)
    worst = 0.0
    for (in_h, in_w), (out_h, out_w) in (((2, 3), (3, 5)), ((7, 7), (4, 3)), ((5, 4), (11, 9)),
                                         ((28, 28), (28, 28)), ((7, 7), (7, 7)), ((6, 6), (13, 17))):
        for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-3)):  # float16: one ulp below 4
            x = rng.standard_normal((1, 3, in_h, in_w)).astype(dtype)
            got = ResizeBilinearShim((out_h, out_w))(mindspore.Tensor(x)).asnumpy()
            err = float(np.abs(got.astype(np.float64) - _bilinear_by_hand(x, out_h, out_w)).max())
            worst = max(worst, err / tol)
            result["cases"].append({"in": [in_h, in_w], "out": [out_h, out_w], "dtype": np.dtype(dtype).name,
                                    "max_abs_err": err, "tol": tol, "out_dtype": str(got.dtype)})
    # The check can tell the semantics apart: half-pixel centres (torch's align_corners=False) miss by far.
    x = rng.standard_normal((1, 3, 5, 4)).astype(np.float32)
    other = ResizeBilinearShim((11, 9), half_pixel_centers=True)(mindspore.Tensor(x)).asnumpy()
    result["control_half_pixel_centers_max_abs_err"] = float(np.abs(other - _bilinear_by_hand(x, 11, 9)).max())
    result["ok"] = bool(result["documented_example_max_abs_err"] <= 1e-5 and worst <= 1.0
                        and result["control_half_pixel_centers_max_abs_err"] > 0.1)
    if not result["ok"]:
        raise RuntimeError(f"ops.ResizeBilinear shim differs from the documented semantics: {result}")
    return result


def patch_pvt(meta):
    """Provide ops.ResizeBilinear (checked); MindSpore 2.10 has none, so nothing of MindSpore's is replaced."""
    meta["resize_bilinear_shim_check"] = check_resize_bilinear_shim()
    if not hasattr(mindspore.ops, "ResizeBilinear"):
        mindspore.ops.ResizeBilinear = ResizeBilinearShim
    # Recorded for every pvt job, also the later ones of a process that installed the shim earlier.
    if mindspore.ops.ResizeBilinear is ResizeBilinearShim:
        meta["reference_patch"] = "ops.ResizeBilinear = ResizeBilinearShim (over ops.ResizeBilinearV2)"


def randomise_pvt_embeddings(net, rng):
    """MindCV initialises PVT's position embeddings and class token to zero; give them values (N(0, 0.5),
    rounded to the parameters' float16 / float32) so that the parity check sees how they are added."""
    names = []
    for name, p in net.parameters_and_names():
        if name.startswith("pos_embed") or name == "cls_token":
            _set(p, rng.normal(0.0, 0.5, p.shape))
            names.append(name)
    return names


# --------------------------------------------------------------------------- MAE pre-training models only

# MindCV 0.3.0 registers mae_{b,l,h}_16_224_pretrain, but their builders start with default_cfgs[name], which
# mae.py does not define (KeyError), and MAEForPretrain's forward needs a mask: MindCV cannot create or run them,
# and their reference records that error. So that featurezoo's parameter count is still checked against MindCV's,
# these names are built once more by MindCV's own builder with an empty default_cfgs entry supplied for the call
# (then removed); only the parameter names, shapes and counts of that build are recorded.
MAE_PRETRAIN = ("mae_b_16_224_pretrain", "mae_l_16_224_pretrain", "mae_h_16_224_pretrain")


def mae_pretrain_params(model):
    import mindcv.models.mae as mae

    mae.default_cfgs[model] = {}
    try:
        net = mindcv.models.create_model(model, num_classes=NUM_CLASSES)  # lazy init: shapes only
    finally:
        del mae.default_cfgs[model]
    params = net.get_parameters()
    return {
        "param_shapes": {p.name: list(p.shape) for p in net.get_parameters()},
        "trainable_params": int(sum(int(np.prod(p.shape)) for p in net.trainable_params())),
        "total_params": int(sum(int(np.prod(p.shape)) for p in params)),
        "params_from": "MindCV's builder with an empty default_cfgs entry (its registered builder fails)",
    }


# --------------------------------------------------------------------------- one job


def run_job(job, out_root, force=False):
    """Compute one reference; returns (status, meta) with status in ok/error/cached."""
    model, size, batch, seed = job["model"], int(job["size"]), int(job["batch"]), int(job["seed"])
    vdir = version_dir(out_root)
    dest = job_dir(out_root, job)
    if not force:
        meta = read_complete_meta(dest)
        if meta is not None:
            return "cached", meta

    vdir.mkdir(parents=True, exist_ok=True)
    tmp = vdir / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    meta = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "size": size,
        "batch": batch,
        "seed": seed,
        "mindcv_version": mindcv.__version__,
        "mindspore_version": mindspore.__version__,
        "num_classes": NUM_CLASSES,
        "default_cfg": default_cfg_for(model),
        "trainable_params": None,
        "total_params": None,
        "param_shapes": None,
        "feature_info": None,
        "num_features": 0,
        "features_error": None,
        "num_outputs": None,
        "randomised_norms": None,
        "error": None,
        "error_stage": None,
    }
    t0 = time.time()
    stage = "create"
    net = wrapper = None
    try:
        seed_everything(seed)
        if model in PVT_V1:
            stage = "patch"
            patch_pvt(meta)
            stage = "create"
        net = create_model(model)
        materialise(net)
        meta["param_shapes"] = {p.name: list(p.shape) for p in net.get_parameters()}
        meta["trainable_params"] = int(sum(int(np.prod(p.shape)) for p in net.trainable_params()))
        meta["total_params"] = int(sum(int(np.prod(p.shape)) for p in net.get_parameters()))
        odd = {p.name: str(p.dtype) for p in net.get_parameters() if p.dtype != mindspore.float32}
        if odd:
            meta["non_float32_params"] = odd
        meta["create_s"] = round(time.time() - t0, 3)
        meta["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA")

        stage = "randomise"
        meta["randomised_norms"] = randomise_norms(net, np.random.RandomState(seed + 1))
        if model in PVT_V1:
            meta["randomised_embeddings"] = randomise_pvt_embeddings(net, np.random.RandomState(seed + 3))
        x = np.random.RandomState(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
        meta["bn"] = job.get("bn", "random")
        stage = "synthesise"
        recipes = synthesise_large_params(net, seed)
        if meta["bn"] == "calibrated":
            stage = "calibrate"
            # 16 images: with batch 2, BNs on 1x1 maps (split attention) get degenerate statistics.
            calib = np.random.RandomState(seed + 2).standard_normal((16, 3, size, size)).astype(np.float32)
            meta["calibrated_bn"] = calibrate_batchnorm(net, calib)
        net.set_train(False)

        stage = "save_weights"
        meta["weights"], small, nbytes = describe_weights(net, recipes)
        np.savez(tmp / "weights.npz", **small)
        if nbytes < KEEP_CKPT_BYTES:
            stage = "save_checkpoint"
            mindspore.save_checkpoint(net, str(tmp / "model.ckpt"))
            os.chmod(tmp / "model.ckpt", 0o644)  # MindSpore writes it 0o400

        stage = "forward"
        t1 = time.time()
        outs = to_numpy_outputs(net(mindspore.Tensor(x)))
        meta["forward_s"] = round(time.time() - t1, 3)
        meta["num_outputs"] = len(outs)
        arrays = {"input": x, "logits": outs[0]}
        for i, o in enumerate(outs[1:], 1):
            arrays[f"output_{i}"] = o
        meta["logits_shape"] = list(outs[0].shape)

        stage = "features"
        try:
            wrapper, fi = build_feature_extractor(model, net)
            if wrapper is not None:
                meta["feature_info"] = json_safe(fi)
                wrapper.set_train(False)
                feats = to_numpy_outputs(wrapper(mindspore.Tensor(x)))
                for i, f in enumerate(feats):
                    arrays[f"feat_{i}"] = f
                meta["num_features"] = len(feats)
                meta["feature_shapes"] = [list(f.shape) for f in feats]
                if len(feats) != len(fi):
                    meta["features_error"] = f"got {len(feats)} features for {len(fi)} feature_info entries"
        except Exception as e:  # features failing must not lose the logits reference
            meta["features_error"] = format_exception(e)
            meta["features_traceback"] = traceback.format_exc(limit=8)[-4000:]
            for k in [k for k in arrays if k.startswith("feat_")]:
                del arrays[k]
            meta["num_features"] = 0

        stage = "save_outputs"
        np.savez(tmp / "outputs.npz", **arrays)
    except Exception as e:
        meta["error"] = format_exception(e)
        meta["error_stage"] = stage
        meta["error_traceback"] = traceback.format_exc(limit=8)[-4000:]
        for fname in ("model.ckpt", "weights.npz", "outputs.npz"):
            (tmp / fname).unlink(missing_ok=True)
        if model in MAE_PRETRAIN and stage == "create":
            meta.update(mae_pretrain_params(model))
    finally:
        del net, wrapper
        gc.collect()

    meta["elapsed_s"] = round(time.time() - t0, 3)
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)

    _install(tmp, dest)
    return ("error" if meta["error"] else "ok"), meta


def _install(tmp, dest):
    """Atomically move tmp into place, replacing a stale/forced existing dir."""
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        # another process installed it concurrently: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_crash_meta(job, out_root, error):
    model, size, batch, seed = job["model"], int(job["size"]), int(job["batch"]), int(job["seed"])
    vdir = version_dir(out_root)
    vdir.mkdir(parents=True, exist_ok=True)
    dest = job_dir(out_root, job)
    tmp = vdir / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {
        "format_version": FORMAT_VERSION, "model": model, "size": size, "batch": batch, "seed": seed,
        "mindcv_version": mindcv.__version__, "mindspore_version": mindspore.__version__,
        "num_classes": NUM_CLASSES, "default_cfg": default_cfg_for(model),
        "trainable_params": None, "total_params": None, "param_shapes": None,
        "feature_info": None, "num_features": 0, "features_error": None,
        "error": error, "error_stage": "process",
    }
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    _install(tmp, dest)
    return meta


# --------------------------------------------------------------------------- CLI


def describe(status, meta, dt):
    if status == "error":
        return f"ERROR[{meta.get('error_stage')}] {str(meta.get('error'))[:300]}"
    parts = [f"params={meta.get('trainable_params')}"]
    if meta.get("logits_shape"):
        parts.append(f"logits={tuple(meta['logits_shape'])}")
    parts.append(f"feats={meta.get('num_features')}")
    if meta.get("features_error"):
        parts.append(f"FEATURES-ERROR {str(meta['features_error'])[:200]}")
    return " ".join(parts)


def load_jobs(args):
    jobs = []
    if args.jobs:
        with open(args.jobs) as f:
            raw = json.load(f)
        for j in raw:
            if isinstance(j, str):
                j = {"model": j}
            jobs.append(dict(j))
    for name in args.model or []:
        jobs.append({"model": name, "size": args.size, "batch": args.batch, "bn": args.bn})
    out = []
    for j in jobs:
        size = j.get("size")
        if size is None:
            cfg = default_cfg_for(j["model"]) or {}
            size = (cfg.get("input_size") or [3, 224, 224])[-1]
        out.append({
            "model": j["model"],
            "size": int(size),
            "batch": int(j.get("batch") or args.batch),
            "seed": int(j.get("seed", args.seed)),
            "bn": j.get("bn", "random"),
        })
    return out


def cmd_param_counts(args, jobs):
    names = list(dict.fromkeys(j["model"] for j in jobs))
    counts, errors = {}, {}
    for i, name in enumerate(names, 1):
        t0 = time.time()
        try:
            seed_everything(args.seed)
            net = create_model(name)
            counts[name] = int(sum(int(np.prod(p.shape)) for p in net.trainable_params()))
            del net
            msg = str(counts[name])
        except Exception as e:
            counts[name] = None
            errors[name] = format_exception(e)
            msg = "ERROR " + errors[name][:300]
        gc.collect()
        print(f"[{i}/{len(names)}] {name}: {msg} ({time.time() - t0:.1f}s)", flush=True)
    Path(args.param_counts).parent.mkdir(parents=True, exist_ok=True)
    with open(args.param_counts, "w") as f:
        json.dump(counts, f, indent=1, sort_keys=True)
    return 1 if errors and args.strict else 0


def run_isolated(job, args):
    """Run one job in a child process so that a hard crash only loses that job."""
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--model", job["model"],
           "--size", str(job["size"]), "--batch", str(job["batch"]), "--seed", str(job["seed"]),
           "--bn", job.get("bn", "random"),
           "--quiet"]
    if args.force:
        cmd.append("--force")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        rc, tail = proc.returncode, (proc.stderr or "")[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"timed out after {args.timeout}s"
    dest = job_dir(args.out, job)
    meta = read_complete_meta(dest)
    if meta is None:
        meta = write_crash_meta(job, args.out, f"ProcessCrash: reference process exited with {rc}: {tail}")
    return ("error" if meta.get("error") else "ok"), meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="reference cache root (e.g. ~/.cache/featurezoo/mindcv-ref)")
    ap.add_argument("--jobs", help='JSON list of {"model": name, "size": int, "batch": int}')
    ap.add_argument("--model", action="append", help="model name (repeatable); combined with --size/--batch")
    ap.add_argument("--size", type=int, default=None, help="input size (default: MindCV default_cfg input_size)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="recompute even if a complete reference exists")
    ap.add_argument("--retry-errors", action="store_true", help="recompute references that recorded an error")
    ap.add_argument("--bn", default="random", choices=["random", "calibrated"],
                    help="BatchNorm statistics: random, or calibrated on a batch (very deep models)")
    ap.add_argument("--shard", metavar="I/N", help="run only every N-th job starting at I (parallel runs)")
    ap.add_argument("--isolate", action="store_true", help="run each job in its own process (crash-safe, slower)")
    ap.add_argument("--timeout", type=float, default=None, help="per-job timeout in seconds with --isolate")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any job recorded an error")
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--list-mindcv-models", action="store_true", help="print MindCV's registered model names as JSON")
    ap.add_argument("--param-counts", metavar="OUT_JSON",
                    help="write {name: trainable_params} for the given models (build only, no forward)")
    args = ap.parse_args(argv)

    mindspore.set_context(mode=mindspore.PYNATIVE_MODE)

    if args.list_mindcv_models:
        print(json.dumps(mindcv.models.list_models()))
        return 0

    jobs = load_jobs(args)
    if args.shard:
        index, count = (int(v) for v in args.shard.split("/"))
        jobs = jobs[index::count]
    if not jobs and not args.shard:
        ap.error("no jobs: give --jobs FILE or --model NAME")
    if args.param_counts:
        return cmd_param_counts(args, jobs)
    if not args.out:
        ap.error("--out is required")

    n_err = n_ok = n_cached = 0
    t_all = time.time()
    for i, job in enumerate(jobs, 1):
        t0 = time.time()
        force = args.force
        if not force and args.retry_errors:
            m = read_complete_meta(job_dir(args.out, job))
            force = m is not None and bool(m.get("error"))
        if args.isolate:
            cached = None if force else read_complete_meta(
                job_dir(args.out, job))
            status, meta = ("cached", cached) if cached is not None else run_isolated(job, args)
        else:
            status, meta = run_job(job, args.out, force=force)
        dt = time.time() - t0
        if status == "cached":
            n_cached += 1
            if meta.get("error"):
                n_err += 1
        elif status == "error":
            n_err += 1
        else:
            n_ok += 1
        if not args.quiet:
            print(f"[{i}/{len(jobs)}] {job['model']} {job['size']}px b{job['batch']} s{job['seed']}: "
                  f"{status} {describe('error' if meta.get('error') else 'ok', meta, dt)} ({dt:.1f}s)", flush=True)
    if not args.quiet:
        print(f"done: {n_ok} computed, {n_cached} cached, {n_err} with errors, "
              f"{time.time() - t_all:.1f}s -> {version_dir(args.out)}", flush=True)
    return 1 if (args.strict and n_err) else 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)  # skip MindSpore's noisy interpreter-exit destructors
