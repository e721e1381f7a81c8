"""The checks that stand between what a user passes and torch: builder arguments,
checkpoint tensors and input sizes, each refused with a ``ValueError`` that names
the culprit and what is valid, before anything is built, copied or computed.

* :func:`check_builder_args`: ``num_classes``, ``in_channels``, the boolean
  switches and the drop rates, wherever a model is built (``create_model``,
  ``call_builder``, ``build_model_with_cfg``).
* :func:`check_keywords`: keywords a callable does not take, found from its
  signature (following ``**kwargs`` up a class's ``__init__`` chain), listed
  with the valid ones and the closest match.
* :func:`check_state_dict` / :func:`check_tensor_kinds`: a checkpoint's keys and
  tensors (dense, strided, real data, a dtype that converts without loss of
  meaning), before any tensor is copied.
* :func:`check_input_size`: an input's sides against the model's declared
  ``min_input_size`` and :class:`featurezoo.cfg.SideRule`.

Layer: the bottom layer; imports only :mod:`featurezoo.cfg`.
"""
from __future__ import annotations

import difflib
import inspect
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Set, Tuple, Type

import torch
import torch.nn as nn

__all__ = ["check_builder_args", "check_keywords", "accepted_keywords", "check_state_dict", "check_tensor_kinds",
           "check_input_size", "check_input_tensor", "autocast_on"]

_BOOL_ARGS = ("pretrained", "features_only", "as_dict", "norm_eval", "ema", "auto_mapping")
_RATE_ARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_builder_args(model_name: str, args: Mapping[str, Any]) -> None:
    """Refuse builder arguments no model can take (``ValueError`` naming the argument and what is valid).

    ``num_classes`` is checked even for feature models, which drop the head: a
    negative count is a mistake wherever it is passed.
    """
    if "num_classes" in args and not (_is_int(args["num_classes"]) and args["num_classes"] >= 0):
        raise ValueError(f"{model_name}: num_classes={args['num_classes']!r} is not valid; use an int >= 0 "
                         f"(0 for no classifier)")
    if "in_channels" in args and not (_is_int(args["in_channels"]) and args["in_channels"] > 0):
        raise ValueError(f"{model_name}: in_channels={args['in_channels']!r} is not valid; use an int >= 1 "
                         f"(3 for RGB)")
    for key in _BOOL_ARGS:
        if key in args and not isinstance(args[key], bool):
            raise ValueError(f"{model_name}: {key} must be True or False, got {args[key]!r}")
    for key in _RATE_ARGS:
        if key in args:
            value = args[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"{model_name}: {key}={value!r} is not valid; use a number in [0, 1)")


def accepted_keywords(fn: Callable[..., Any]) -> Optional[Set[str]]:
    """The keyword arguments ``fn`` takes, or ``None`` if it takes any (``**kwargs`` that go
    somewhere its signature does not say). For a class, ``**kwargs`` in ``__init__`` is
    followed up the base classes (``super().__init__(**kwargs)``) to ``nn.Module``, which takes none."""
    if isinstance(fn, type):
        names: Set[str] = set()
        for cls in fn.__mro__:
            if cls in (nn.Module, object):
                return names - {"self"}
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names - {"self"}
        return names - {"self"}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_keywords(model_name: str, fn: Callable[..., Any], kwargs: Iterable[str],
                   also_valid: Iterable[str] = ()) -> None:
    """Refuse keywords ``fn`` does not take, listing the valid ones (``also_valid``: keywords
    taken before ``fn`` is called, e.g. ``features_only``) and the closest match."""
    accepted = accepted_keywords(fn)
    if accepted is None:
        return
    unknown = sorted(k for k in kwargs if k not in accepted)
    if not unknown:
        return
    valid = sorted(accepted | set(also_valid))
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, valid, n=1, cutoff=0.6)
        if close:
            hints.append(f"{k!r} -> {close[0]!r}")
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise ValueError(f"{model_name}: unknown keyword argument(s) {unknown}{hint}; valid keywords: {', '.join(valid)}")


# -- checkpoints ---------------------------------------------------------------------------------


def _tensor_problem(value: Any) -> str:
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.is_meta:
        return "is a meta-device tensor (it holds no data)"
    if value.layout != torch.strided:
        return f"is a {value.layout} tensor; only dense (strided) tensors load"
    if value.is_quantized:
        return f"is a quantized ({value.dtype}) tensor; dequantize it first"
    return ""


def check_state_dict(state: Mapping[Any, Any], where: str, error: Type[ValueError] = ValueError) -> None:
    """Every key a ``str`` and every value a dense, strided tensor with data (not meta,
    sparse or quantized). Raises ``error`` naming the first offending entries."""
    bad = []
    for key, value in state.items():
        if not isinstance(key, str):
            bad.append(f"key {key!r} is of type {type(key).__name__}, not a str")
        else:
            problem = _tensor_problem(value)
            if problem:
                bad.append(f"{key!r} {problem}")
        if len(bad) >= 8:
            break
    if bad:
        raise error(f"{where} cannot be loaded, nothing was loaded: " + "; ".join(bad))


def _dtype_fits(src: torch.Tensor, dst: torch.dtype) -> bool:
    if dst.is_floating_point:
        return src.dtype.is_floating_point
    if dst.is_complex:
        return src.dtype.is_complex or src.dtype.is_floating_point
    if dst == torch.bool:
        return src.dtype == torch.bool
    if src.dtype.is_floating_point:  # an index buffer saved as floats (MindSpore does) converts if whole
        return bool(torch.isfinite(src).all()) and torch.equal(src, src.round())
    return not (src.dtype.is_complex or src.dtype == torch.bool)


def check_tensor_kinds(tensors: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], model_name: str,
                       where: str, error: Type[ValueError] = ValueError) -> None:
    """Each tensor's dtype converts meaningfully into the model's tensor of that name:
    floating into floating, integer (or whole floats) into integer, bool into bool (a bool or
    int conv weight, or a fractional step counter, is refused). Raises ``error`` naming the keys."""
    bad = [f"{k}: checkpoint {t.dtype} into model {own[k].dtype}"
           for k, t in tensors.items() if k in own and not _dtype_fits(t, own[k].dtype)]
    if bad:
        raise error(f"{model_name}: {len(bad)} tensor(s) of the wrong kind in {where}, nothing was loaded:\n  "
                    + "\n  ".join(bad[:20]))


# -- input sizes ---------------------------------------------------------------------------------


def check_input_tensor(model_name: str, x: Any, in_channels: Optional[int],
                       weight_dtype: Optional[torch.dtype]) -> None:
    """An image batch the backbone can take: a 4-d (N, C, H, W) floating tensor with ``in_channels``
    channels (``None``: any), of the weights' dtype (unless autocast converts it)."""
    chs = "C" if in_channels is None else in_channels
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{model_name}: the input must be a torch.Tensor (N, {chs}, H, W), "
                         f"got a {type(x).__name__}")
    if x.dim() != 4 or in_channels is not None and x.shape[1] != in_channels or x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"{model_name}: the input must be (N, {chs}, H, W) with H, W >= 1, got shape "
                         f"{tuple(x.shape)}"
                         + (" (add the batch dimension: x[None])" if x.dim() == 3 else ""))
    if not x.is_floating_point():
        raise ValueError(f"{model_name}: the input must be a floating tensor ({weight_dtype or torch.float32}), "
                         f"got {x.dtype}; convert images with x.float() / 255 and normalise them")
    if weight_dtype is not None and x.dtype != weight_dtype and weight_dtype.is_floating_point \
            and not autocast_on(x.device.type):
        raise ValueError(f"{model_name}: the input is {x.dtype} but the weights are {weight_dtype}; use "
                         f"x.to({weight_dtype}), model.to({x.dtype}), or torch.autocast")


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; never for a device type autocast does not know (meta),
    where ``torch.is_autocast_enabled`` raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def check_input_size(cfg: Any, x: Any, model_name: str, deepest_reduction: Optional[int] = None,
                     whole_depth: bool = True) -> None:
    """Refuse an input whose sides the model cannot take, from its declared facts:
    ``min_input_size`` and ``side_rules`` (:class:`featurezoo.cfg.SideRule`; for a feature model
    whose deepest output has ``deepest_reduction``, the rules that cover that level).
    ``min_input_size`` is the whole model's: it holds a feature model only if ``whole_depth``
    (its deepest output is at the model's deepest stride; shallower levels check their own stages)."""
    if cfg is None or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return
    low = getattr(cfg, "min_input_size", None) if whole_depth else None
    rules = [r for r in getattr(cfg, "side_rules", ())
             if deepest_reduction is None or deepest_reduction >= r.from_reduction]
    if low is None and not rules:
        return
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if low is not None and (h < low[1] or w < low[2]):
        raise ValueError(f"{model_name}: input {h}x{w} px is too small; the smallest it takes is "
                         f"{low[1]}x{low[2]} px ({cfg.size_note})")
    for rule in rules:
        bad = [s for s in (h, w) if not rule.accepts(s)]
        if bad:
            near = sorted({v for s in bad for v in rule.nearest(s)})
            raise ValueError(f"{model_name}: input {h}x{w} px is not a size it takes: {rule.describe()}; "
                             f"valid sides near it: {near} ({cfg.size_note})")

