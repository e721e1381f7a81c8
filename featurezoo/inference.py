"""The inference path: a feature model (or any model of the zoo) made cheaper to run, same outputs.

:func:`optimize_for_inference` returns a module in eval mode whose forward takes
the same float32 input and returns the same structure as the model it was given
(a list or dict of NCHW maps for a feature model). On a copy of the model
(``inplace=False``, the default) it

1. re-parameterises multi-branch blocks: every module with a ``reparameterize()``
   method (RepVGG's blocks, RepMLP's blocks) folds itself into its deploy form;
2. folds each BatchNorm into the convolution that feeds it, where that is exact:
   the pairs are found by running the model once on a small probe input and
   recording every torch call (a ``TorchFunctionMode``), so a pair is folded only
   when the conv's output goes to the BatchNorm and nowhere else (not to a
   returned feature, not to a residual), when each module runs once per forward,
   and when the conv's weight is used by that conv only. This sees through any
   Python in the forward (size-dependent branches, untraceable models) that an
   FX graph would have to treat as opaque;
3. replaces modules that are the identity in eval mode (``Dropout``, ``DropPath``)
   by ``nn.Identity``, and turns off gradients on every parameter (no autograd
   records are kept even without ``torch.no_grad``);
4. runs in channels-last memory where it helps (``channels_last="auto"``: models
   whose parameters are mostly convolution weights);
5. computes float32 ``nn.Linear`` layers with oneDNN's matrix kernels instead of the BLAS
   (:class:`featurezoo.layers.linear.OneDnnLinear`) where those are faster on this CPU
   (``linear="auto"``: timed once per process; on the AMD EPYC of the README's table 1.25-2.39x
   faster over six transformer layer shapes, ``benchmarks/bench_linear.py``; the bulk of the
   transformer families' time);
6. optionally runs under ``torch.autocast`` in bfloat16, where the hardware has
   bfloat16 arithmetic (see :func:`bf16_support`); the outputs are returned in
   float32;
7. optionally wraps the result in ``torch.compile``.

Outputs equal the eager model's within 1e-5 of the largest output magnitude in
float32 (``tests/test_inference.py`` checks every model of the zoo).

Layer: the model layer (imports :mod:`featurezoo.layers` and :mod:`featurezoo.freezing`).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .freezing import probe_input_size
from .layers.drop_path import DropPath
from .layers.linear import onednn_linear_available, onednn_linear_faster, use_onednn_linears
from .layers.padding import Conv2d as SameConv2d

__all__ = ["optimize_for_inference", "InferenceModel", "bf16_support", "hardware_report", "fold_batchnorms"]

_logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LINEAR_KERNELS = ("auto", "onednn", "aten")
# Convolutions whose forward uses ``weight`` and ``bias`` linearly (a BatchNorm after them folds exactly).
# Subclasses that transform the weight in forward (BiT's weight standardisation) are deliberately absent.
_FOLDABLE_CONVS = (nn.Conv2d, SameConv2d)
_EVAL_IDENTITIES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, DropPath)
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Reading these is not a use of a tensor's values.
_METADATA_CALLS = frozenset({"size", "dim", "numel", "stride", "is_contiguous", "storage_offset", "element_size",
                             "is_floating_point", "is_complex", "nelement", "ndimension", "get_device", "__len__",
                             "data_ptr", "type"})
_VALUE_PROPERTIES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag", "grad"})


# -- hardware -----------------------------------------------------------------------------------------
def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def bf16_support(device: Union[str, torch.device] = "cpu") -> Tuple[bool, str]:
    """Whether ``device`` has bfloat16 arithmetic, and a sentence saying what was found.

    CPU: the ``avx512_bf16`` or ``amx_bf16`` flag in ``/proc/cpuinfo`` (without
    them PyTorch runs bfloat16 through emulation, slower than float32). CUDA:
    ``torch.cuda.is_bf16_supported()``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return ok, f"{name}: bfloat16 {'supported' if ok else 'not supported'} (torch.cuda.is_bf16_supported)"
    if device.type != "cpu":
        return False, f"bfloat16 detection knows cpu and cuda, not {device.type}"
    flags = set(_cpu_flags())
    found = [f for f in _CPU_BF16_FLAGS + ("amx_tile",) if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    if any(f in flags for f in _CPU_BF16_FLAGS):
        return True, f"CPU capability {capability}, bfloat16 flags: {', '.join(found)}"
    return False, (f"CPU capability {capability}; /proc/cpuinfo lacks {' and '.join(_CPU_BF16_FLAGS)} "
                   f"(no AVX512-BF16 or AMX): bfloat16 would be emulated, slower than float32")


def hardware_report() -> Dict[str, Any]:
    """What ``featurezoo bench`` prints: the CPU's vector capability, bfloat16 support per device, and the
    float32 linear kernel ``linear="auto"`` picks on this CPU."""
    cpu_ok, cpu_why = bf16_support("cpu")
    report: Dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "cpu_bf16": cpu_ok, "cpu_bf16_detail": cpu_why,
                              "threads": torch.get_num_threads(),
                              "cpu_linear": "onednn" if onednn_linear_faster() else "aten"}
    if torch.cuda.is_available():
        cuda_ok, cuda_why = bf16_support("cuda")
        report.update(cuda_bf16=cuda_ok, cuda_bf16_detail=cuda_why)
    return report


# -- BatchNorm folding ----------------------------------------------------------------------------------
def _foldable_bn(m: nn.Module) -> bool:
    return (type(m) is nn.BatchNorm2d and not m.training and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


class _Recorder(TorchFunctionMode):
    """Records, during one forward, which module was running when each watched tensor was used, and how
    often each watched weight was used."""

    def __init__(self, weights: Dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.stack: List[nn.Module] = []
        self.watched: Dict[int, torch.Tensor] = {}  # id -> tensor (held, so ids are not reused)
        self.uses: Dict[int, List[Optional[nn.Module]]] = {}
        self.weights = weights
        self.weight_uses: Dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_metadata(func):
            for t in _tensors_in((args, kwargs)):
                if id(t) in self.watched:
                    self.uses[id(t)].append(self.stack[-1] if self.stack else None)
                elif id(t) in self.weights:
                    self.weight_uses[id(t)] = self.weight_uses.get(id(t), 0) + 1
        return func(*args, **kwargs)


def _is_metadata(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "") not in _VALUE_PROPERTIES
    return name in _METADATA_CALLS


def _tensors_in(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)


def _find_fold_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm takes the conv's output and nothing else
    uses it, found by running ``model`` on ``example`` (see the module docstring)."""
    named = dict(model.named_modules(remove_duplicate=False))
    counts: Dict[int, int] = {}
    for m in named.values():
        counts[id(m)] = counts.get(id(m), 0) + 1
    names = {id(m): n for n, m in named.items()}
    convs = {id(m) for m in named.values() if type(m) in _FOLDABLE_CONVS and counts[id(m)] == 1}
    bns = {id(m) for m in named.values() if _foldable_bn(m) and counts[id(m)] == 1}
    weights = {id(named[names[c]].weight): named[names[c]].weight for c in convs}

    rec = _Recorder(weights)
    calls: Dict[int, int] = {}
    conv_out: Dict[int, int] = {}   # conv id -> id of its output tensor
    bn_in: Dict[int, int] = {}      # bn id -> id of its input tensor
    handles = []

    def pre(mod: nn.Module, args: Tuple[Any, ...]) -> None:
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if id(mod) in bns and args and isinstance(args[0], torch.Tensor):
            bn_in[id(mod)] = id(args[0])
        rec.stack.append(mod)

    def post(mod: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        rec.stack.pop()
        if id(mod) in convs and isinstance(out, torch.Tensor):
            conv_out[id(mod)] = id(out)
            rec.watched[id(out)] = out
            rec.uses[id(out)] = []

    for m in {id(m): m for m in named.values()}.values():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad(), rec:
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    returned = {id(t) for t in _tensors_in(list(out.values()) if isinstance(out, dict) else out)}
    by_output = {t: c for c, t in conv_out.items()}
    pairs = []
    for b, t in bn_in.items():
        c = by_output.get(t)
        if c is None or t in returned or calls.get(c) != 1 or calls.get(b) != 1:
            continue
        if rec.weight_uses.get(id(named[names[c]].weight), 0) != 1:
            continue
        bn = named[names[b]]
        if named[names[c]].out_channels != bn.num_features:
            continue
        uses = rec.uses[t]
        if uses and all(u is bn for u in uses):
            pairs.append((names[c], names[b]))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` becomes ``bn(conv(x))`` (computed in float64, rounded once)."""
    w = conv.weight
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    w.copy_(w.double() * scale.reshape(-1, *([1] * (w.dim() - 1))))
    new_bias = ((bias - mean) * scale + beta).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _replace(root: nn.Module, replacements: Dict[str, nn.Module]) -> None:
    """Put new modules at the given names, and in any list/tuple/dict attribute of a module of ``root``
    that held the old ones (a feature wrapper's plan of steps holds module references)."""
    swapped: Dict[int, nn.Module] = {}
    for name, new in replacements.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        swapped[id(parent._modules[leaf])] = new
        parent._modules[leaf] = new

    def remap(v: Any) -> Tuple[Any, bool]:
        if isinstance(v, nn.Module):
            new = swapped.get(id(v), v)
            return new, new is not v
        if isinstance(v, (list, tuple, set, frozenset)) and not hasattr(v, "_fields"):
            items = [remap(x) for x in v]
            if not any(changed for _, changed in items):
                return v, False
            return type(v)(x for x, _ in items), True
        if type(v) is dict:
            items = {k: remap(x) for k, x in v.items()}
            if not any(changed for _, changed in items.values()):
                return v, False
            return {k: x for k, (x, _) in items.items()}, True
        return v, False

    for m in list(root.modules()):
        for key, value in list(vars(m).items()):
            if key in ("_modules", "_parameters", "_buffers"):
                continue
            new_value, changed = remap(value)
            if changed:
                object.__setattr__(m, key, new_value)


def fold_batchnorms(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold, in place, every BatchNorm of ``model`` (in eval mode) that only normalises a conv's output
    into that conv, found by running ``model`` on ``example``; returns the (conv, BatchNorm) name pairs."""
    pairs = _find_fold_pairs(model, example)
    for conv_name, bn_name in pairs:
        _fold(model.get_submodule(conv_name), model.get_submodule(bn_name))
    _replace(model, {bn_name: nn.Identity() for _, bn_name in pairs})
    return pairs


# -- the inference module -------------------------------------------------------------------------------
def _probe_input(model: nn.Module, device: torch.device) -> torch.Tensor:
    """A small input the model accepts (batch 1), from its declared size facts."""
    cfg = getattr(model, "default_cfg", None)
    h, w = probe_input_size(cfg)
    chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    return torch.randn(1, chans, h, w, device=device)


def _conv_share(model: nn.Module) -> float:
    """The fraction of parameters that are 2-D convolution weights (channels-last pays off above half:
    measured on resnet50, efficientnet_b0, mobilenet_v3_large_100, densenet121, regnet_y_1_6gf; README)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)) / total


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype != torch.float32 and out.is_floating_point() else out
    if isinstance(out, list):
        return [_to_float32(v) for v in out]
    if isinstance(out, tuple):
        return type(out)(*(_to_float32(v) for v in out)) if hasattr(out, "_fields") else \
            tuple(_to_float32(v) for v in out)
    if isinstance(out, dict):
        return type(out)((k, _to_float32(v)) for k, v in out.items())
    return out


class InferenceModel(nn.Module):
    """The result of :func:`optimize_for_inference`: the optimised model (``.model``) and how it runs.

    Attributes the wrapped model has (``feature_info``, ``out_channels``,
    ``out_indices``, ``output_shape()``, ...) are read through. Always in eval
    mode: ``train(True)`` is a ``ValueError`` (BatchNorms are folded away).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, channels_last: bool, compiled: Optional[Any],
                 folded: List[Tuple[str, str]], reparameterized: int, onednn_linears: int = 0):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self.folded = folded
        self.reparameterized = reparameterized
        self.onednn_linears = onednn_linears
        object.__setattr__(self, "_compiled", compiled)
        self.training = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:
            raise ValueError("an optimize_for_inference model runs in eval mode only (its BatchNorms are folded "
                             "into convolutions); optimise a fresh copy of the eager model after training")
        return self

    def forward(self, x: torch.Tensor) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        run = self._compiled if self._compiled is not None else self.model
        if self.dtype == torch.float32:
            return run(x)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = run(x)
        return _to_float32(out)

    def extra_repr(self) -> str:
        return (f"dtype={str(self.dtype).replace('torch.', '')}, channels_last={self.channels_last}, "
                f"compiled={self._compiled is not None}, folded_batchnorms={len(self.folded)}, "
                f"reparameterized={self.reparameterized}, onednn_linears={self.onednn_linears}")


def _check_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"optimize_for_inference: dtype={dtype!r} is not supported; valid: "
                     f"{list(_DTYPES)} (or torch.float32 / torch.bfloat16)")


def optimize_for_inference(model: nn.Module, *, dtype: Union[str, torch.dtype] = "float32",
                           channels_last: Union[str, bool] = "auto", compile: bool = False,
                           inplace: bool = False, example_input: Optional[torch.Tensor] = None,
                           allow_emulated_bf16: bool = False, linear: str = "auto") -> InferenceModel:
    """The model made cheaper to run for inference, computing the same outputs (see the module docstring).

    Args:
        model: a model of the zoo, a feature model, or any ``nn.Module``.
        dtype: ``"float32"`` or ``"bfloat16"`` (autocast; needs hardware bfloat16, see :func:`bf16_support`).
        channels_last: ``"auto"`` (on when most parameters are spatial conv weights), ``True`` or ``False``.
        compile: wrap the optimised model in ``torch.compile`` (compiles on the first call).
        inplace: optimise ``model`` itself instead of a copy (saves the copy's memory; ``model`` is then
            changed: BatchNorms folded, eval mode).
        example_input: the probe input for finding conv-BatchNorm pairs (default: batch 1 at the smallest
            size the model's cfg allows).
        allow_emulated_bf16: run bfloat16 even where the hardware lacks it (emulated, slow; for measuring
            the bfloat16 error on any machine).
        linear: the float32 CPU kernel of ``nn.Linear`` layers: ``"auto"`` (oneDNN where it times at least
            10% faster than ``F.linear`` on this CPU, see :func:`featurezoo.layers.linear.onednn_linear_faster`),
            ``"onednn"`` or ``"aten"`` (PyTorch's ``F.linear``). Only float32 on the CPU is affected.

    >>> m = optimize_for_inference(create_model("resnet18", features_only=True))  # doctest: +SKIP
    >>> [f.shape[1] for f in m(torch.randn(1, 3, 64, 64))]                      # doctest: +SKIP
    [64, 64, 128, 256, 512]
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize_for_inference: model must be an nn.Module, got {type(model).__name__}")
    dtype = _check_dtype(dtype)
    if channels_last not in ("auto", True, False):
        raise ValueError(f"optimize_for_inference: channels_last={channels_last!r}; valid: 'auto', True, False")
    for flag, value in (("compile", compile), ("inplace", inplace), ("allow_emulated_bf16", allow_emulated_bf16)):
        if not isinstance(value, bool):
            raise ValueError(f"optimize_for_inference: {flag} must be True or False, got {value!r}")
    if linear not in _LINEAR_KERNELS:
        raise ValueError(f"optimize_for_inference: linear={linear!r}; valid: {list(_LINEAR_KERNELS)}")
    if linear == "onednn" and not onednn_linear_available():
        raise ValueError("optimize_for_inference: linear='onednn' needs a PyTorch built with oneDNN "
                         "(torch.backends.mkldnn.is_available() is False); use linear='auto' or 'aten'")
    if isinstance(model, InferenceModel):
        raise ValueError("optimize_for_inference: the model is already optimised (an InferenceModel)")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "meta":
        raise ValueError("optimize_for_inference: the model is on the meta device (no weights); "
                         "build it on cpu or cuda")
    if dtype == torch.bfloat16 and not allow_emulated_bf16:
        ok, why = bf16_support(device)
        if not ok:
            raise ValueError(f"optimize_for_inference: dtype=bfloat16 needs bfloat16 hardware on {device}: {why}. "
                             f"Use dtype='float32', or allow_emulated_bf16=True to run it anyway")
    if compile and not hasattr(torch, "compile"):
        raise ValueError(f"optimize_for_inference: compile=True needs torch.compile (torch {torch.__version__})")

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    reparam = [m for m in model.modules() if callable(getattr(m, "reparameterize", None))]
    for m in reparam:
        m.reparameterize()

    example = example_input if example_input is not None else _probe_input(model, device)
    folded = fold_batchnorms(model, example)
    identities = [n for n, m in model.named_modules() if isinstance(m, _EVAL_IDENTITIES) and n]
    # DropPath holds a Dropout: replace the outermost only.
    _replace(model, {n: nn.Identity() for n in identities if not any(n.startswith(o + ".") for o in identities)})

    if channels_last == "auto":
        channels_last = _conv_share(model) >= 0.5
    if channels_last:
        model.to(memory_format=torch.channels_last)
    onednn = 0
    if device.type == "cpu" and dtype == torch.float32 and (
            linear == "onednn" or (linear == "auto" and any(type(m) is nn.Linear for m in model.modules())
                                   and onednn_linear_faster())):
        onednn = use_onednn_linears(model)
    compiled = torch.compile(model) if compile else None
    _logger.info("optimize_for_inference: %d BatchNorms folded, %d blocks re-parameterised, %d linears on oneDNN, "
                 "channels_last=%s, dtype=%s, compile=%s", len(folded), len(reparam), onednn, channels_last, dtype,
                 compile)
    return InferenceModel(model, dtype=dtype, channels_last=channels_last, compiled=compiled, folded=folded,
                          reparameterized=len(reparam), onednn_linears=onednn)
