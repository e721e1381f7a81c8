"""The feature contract: ``feature_info``, ``out_indices`` and the wrapper that
turns a classifier into a backbone returning a feature pyramid.

A model registers its extractable layers in ``self.feature_info``, a list of
``dict(chs=, reduction=, name=)`` appended in ``__init__`` (see the MindCV
guide). :class:`FeatureExtractWrapper` then serves one of three kinds of model:

* **sequential** (the guide's scenarios 1 and 2): the model's forward is its
  top-level children called in registration order, each once. A feature
  ``name`` is a top-level child or, inside an ``nn.Sequential``, a dotted path
  (``"features.3"``); such a container is entered and its children run in
  order, which computes exactly what the container would. ``flatten_sequential``
  is accepted and implied.
* **rewritten** (scenario 3, ``is_rewritten = True``): ``forward_features``
  returns one tensor per ``feature_info`` entry.
* **levels** (our extension for models whose forward is not a chain of
  modules: HRNet, DPN, Inception, ViTs): the model implements
  ``forward_levels(x, indices)`` (the ``feature_info`` entries ``indices``, in
  ascending order, computing nothing past the deepest) and
  ``prune_levels(indices)`` (delete the head and everything past the deepest),
  so the same forward code serves the classifier and the backbone. Both start
  with :func:`take_levels`. (The names are not timm's ``forward_intermediates``
  / ``prune_intermediate_layers``, whose signatures and return values differ.)

:class:`FeatureExtractWrapper` picks one of three small classes
(:class:`SequentialFeatures`, :class:`LevelFeatures`, :class:`RewrittenFeatures`);
each holds the model's own modules, parameters and buffers under their own
names, so ``state_dict()`` keys are the full model's keys for what it kept.

At wrap time the declarations are checked against one forward of the model (on
the meta device, its weights swapped for meta tensors and put back; a small
real input only if it cannot run there; in eval mode, without gradients):
every entry's channels and stride, and, for a sequential
model, that its forward really is the chain the wrapper will run (each feature
module called once, in registration order, each taking the previous one's
output). Declarations that pass are remembered per architecture, so wrapping
the same model again costs no forward. The zoo's own models are not probed at
wrap time: tests/test_contract.py checks every one of them the same way, at two
sizes, so a user's create_model pays nothing for them.

Layer: imports :mod:`featurezoo.registry` (for meta-device builds), :mod:`featurezoo.freezing`
and :mod:`featurezoo.validate`.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from .freezing import (apply_eval_modes, check_frozen_stages, frozen_modules, frozen_parameter_names,
                       num_stages, probe_input_size)
from .registry import build_on_meta
from .validate import check_input_size, check_input_tensor

__all__ = ["FeatureInfo", "FeatureExtractWrapper", "SequentialFeatures", "LevelFeatures", "RewrittenFeatures",
           "normalize_out_indices", "take_levels", "get_feature_info", "PYRAMID", "ShapeSpec"]

_logger = logging.getLogger(__name__)

PYRAMID = "pyramid"
# A sequential model's feature module may output channels-last maps (a user's Swin-like blocks):
# declare fmt="NHWC" on its entry and the wrapper returns it NCHW.
_FORMATS = ("NCHW", "NHWC")
_REQUIRED_KEYS = ("chs", "reduction", "name")


class FeatureInfo:
    """Validated, read-only view of a model's ``feature_info`` entries.

    >>> info = FeatureInfo([dict(chs=64, reduction=2, name="relu"), dict(chs=256, reduction=4, name="layer1")])
    >>> info.channels(), info.reduction(), info.module_name(1)
    ([64, 256], [2, 4], 'layer1')
    """

    def __init__(self, entries: Sequence[Mapping[str, Any]], model_name: str = "model",
                 module: Optional[nn.Module] = None):
        self.model_name = model_name
        if isinstance(entries, FeatureInfo):
            entries = entries.info
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError(
                f"{model_name} does not support features_only: its feature_info must be a non-empty list of "
                f"dict(chs=, reduction=, name=), got {entries!r}"
            )
        self.info: List[Dict[str, Any]] = []
        for i, entry in enumerate(entries):
            self.info.append(self._check_entry(i, entry, module))

    def _check_entry(self, i: int, entry: Any, module: Optional[nn.Module]) -> Dict[str, Any]:
        where = f"{self.model_name}: feature_info[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict(chs=, reduction=, name=), got {entry!r}")
        missing = [k for k in _REQUIRED_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{where} = {dict(entry)!r} lacks key(s) {missing}; each entry needs {list(_REQUIRED_KEYS)}")
        for key in ("chs", "reduction"):
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}[{key!r}] must be a positive int, got {value!r}")
        name = entry["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}['name'] must be a module name (str), got {name!r}")
        fmt = entry.get("fmt", "NCHW")
        if fmt not in _FORMATS:
            raise ValueError(f"{where}['fmt'] = {fmt!r}; valid: {list(_FORMATS)}")
        if module is not None:
            for j, earlier in enumerate(self.info):
                if earlier["name"] == name:
                    raise ValueError(f"{where}['name'] = {name!r} is also entry {j}'s module; each entry must name "
                                     f"a different module (one module has one output)")
            try:
                module.get_submodule(name)
            except AttributeError:
                top = ", ".join(n for n, _ in module.named_children())
                raise ValueError(
                    f"{where}['name'] = {name!r} is not a module of the model; names are named_modules() paths, "
                    f"top-level modules are: {top}"
                ) from None
        return dict(entry)

    # -- selection -----------------------------------------------------------------
    def table(self) -> str:
        """The entries as a text table (used in error messages and the CLI)."""
        rows = [("index", "name", "chs", "reduction")]
        rows += [(str(i), e["name"], str(e["chs"]), str(e["reduction"])) for i, e in enumerate(self.info)]
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

    def select(self, indices: Sequence[int]) -> "FeatureInfo":
        return FeatureInfo([self.info[i] for i in indices], self.model_name)

    # -- accessors (timm-compatible) ---------------------------------------------------
    def get(self, key: str, idx: Union[int, Sequence[int], None] = None) -> Any:
        if idx is None:
            return [e[key] for e in self.info]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def channels(self, idx: Union[int, Sequence[int], None] = None) -> Any:
        return self.get("chs", idx)

    def reduction(self, idx: Union[int, Sequence[int], None] = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: Union[int, Sequence[int], None] = None) -> Any:
        return self.get("name", idx)

    def get_dicts(self) -> List[Dict[str, Any]]:
        return [dict(e) for e in self.info]

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.info)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FeatureInfo):
            return self.info == other.info
        if isinstance(other, (list, tuple)):
            return self.info == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FeatureInfo({self.model_name}, {self.info})"


def normalize_out_indices(out_indices: Union[Sequence[int], str, None], info: FeatureInfo) -> List[int]:
    """The one place ``out_indices`` is interpreted.

    * ``None``: every entry, in order.
    * ``"pyramid"``: the last entry at each distinct reduction, in order; the
      standard detector pyramid even for models that list one entry per block.
    * a sequence of ints: entries in the order given; negative values count
      from the end. Duplicates and out-of-range values are errors.
    """
    n = len(info)
    if out_indices is None:
        return list(range(n))
    if isinstance(out_indices, str):
        if out_indices != PYRAMID:
            raise ValueError(
                f"{info.model_name}: out_indices={out_indices!r} is not valid; use a list of ints, None (all), "
                f"or {PYRAMID!r}"
            )
        last_at: Dict[int, int] = {}
        for i, r in enumerate(info.reduction()):
            last_at[r] = i
        return sorted(last_at.values())
    if isinstance(out_indices, (int, bool)) or not isinstance(out_indices, Sequence):
        raise ValueError(
            f"{info.model_name}: out_indices must be a sequence of ints (e.g. [1, 2, 3]), None or {PYRAMID!r}, "
            f"got {out_indices!r}. Valid entries:\n{info.table()}"
        )
    if len(out_indices) == 0:
        raise ValueError(f"{info.model_name}: out_indices is empty. Valid entries:\n{info.table()}")
    result: List[int] = []
    for idx in out_indices:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"{info.model_name}: out_indices entries must be ints, got {idx!r}")
        if not -n <= idx < n:
            raise ValueError(
                f"{info.model_name}: out_indices entry {idx} is out of range; {n} entries, valid indices "
                f"{-n}..{n - 1}:\n{info.table()}"
            )
        pos = idx % n
        if pos in result:
            raise ValueError(
                f"{info.model_name}: out_indices {list(out_indices)!r} names entry {pos} "
                f"({info.module_name(pos)}) twice. Valid entries:\n{info.table()}"
            )
        result.append(pos)
    return result


def _sequential_plan(model: nn.Module, targets: Sequence[str], model_name: str) -> List[Tuple[str, nn.Module]]:
    """The (name, module) steps to run, in order, up to the last target.

    Containers that hold a target are entered (only ``nn.Sequential``, whose
    forward is exactly its children in order); everything after the last
    target is left out.
    """
    remaining = set(targets)
    steps: List[Tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if not remaining:
                return
            full = prefix + name
            if full in remaining:
                steps.append((full, child))
                remaining.discard(full)
            elif any(t.startswith(full + ".") for t in remaining):
                if not isinstance(child, nn.Sequential):
                    inner = sorted(t for t in remaining if t.startswith(full + "."))
                    raise ValueError(
                        f"{model_name}: feature(s) {inner} lie inside {full!r}, a {type(child).__name__}; only an "
                        f"nn.Sequential can be entered. Register {full!r} itself, or implement "
                        f"forward_intermediates / is_rewritten for this model"
                    )
                walk(child, full + ".")
            else:
                steps.append((full, child))

    walk(model, "")
    if remaining:
        raise ValueError(
            f"{model_name}: feature(s) {sorted(remaining)} are nested inside another requested feature; "
            f"a sequential model cannot output both a container and a module inside it"
        )
    return steps


def _prune_after(model: nn.Module, steps: List[Tuple[str, nn.Module]]) -> None:
    """Drop every module the steps do not run: later siblings at each entered level."""
    kept = {name for name, _ in steps}
    entered = {name.rsplit(".", 1)[0] for name in kept if "." in name}
    # Every prefix of a dotted step name is a container that was entered.
    for name in list(entered):
        parts = name.split(".")
        entered.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def prune(module: nn.Module, prefix: str) -> None:
        for name in list(module._modules):
            full = prefix + name
            if full in entered:
                prune(module._modules[name], full + ".")
            elif full not in kept:
                del module._modules[name]

    prune(model, "")


class ShapeSpec(NamedTuple):
    """A level's channels and stride (the fields detectron2's ``ShapeSpec`` has; height and width
    are left ``None`` because a backbone runs at any size)."""

    channels: int
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None


def _level_names(level_names: Union[str, Sequence[str], None], info: "FeatureInfo", model_name: str) -> List[str]:
    """The output names: the feature names (default), a list, or a pattern with ``{stride}``,
    ``{level}`` (log2 of the stride: ``"res{level}"`` gives detectron2's res2..res5) or ``{index}``."""
    n = len(info)
    if level_names is None:
        names = [e["name"] for e in info]
    elif isinstance(level_names, str):
        names = []
        for i, e in enumerate(info):
            r = e["reduction"]
            level = int(math.log2(r)) if r & (r - 1) == 0 else None
            if "{level}" in level_names and level is None:
                raise ValueError(f"{model_name}: level_names={level_names!r} uses {{level}} (log2 of the stride) "
                                 f"but entry {e['name']!r} has stride {r}, not a power of two; use {{stride}}")
            try:
                names.append(level_names.format(stride=r, level=level, index=i))
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{model_name}: level_names={level_names!r} is not a valid pattern ({err}); "
                                 f"use {{stride}}, {{level}} or {{index}}, e.g. 'res{{level}}'") from None
    elif isinstance(level_names, Sequence) and all(isinstance(v, str) and v for v in level_names):
        names = list(level_names)
        if len(names) != n:
            raise ValueError(f"{model_name}: level_names has {len(names)} names for {n} outputs "
                             f"({[e['name'] for e in info]})")
    else:
        raise ValueError(f"{model_name}: level_names must be None, a pattern like 'res{{level}}' or a list of "
                         f"non-empty strings, got {level_names!r}")
    dup = sorted({v for v in names if names.count(v) > 1})
    if dup:
        raise ValueError(f"{model_name}: level_names gives the name(s) {dup} to several outputs "
                         f"(strides {[e['reduction'] for e in info]}); use '{{index}}' or a list")
    return names


def _declared_first_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    """The first of the cfg's ``first_conv_names`` that is a conv in ``model``, or ``None``."""
    for name in getattr(getattr(model, "default_cfg", None), "first_conv_names", ()):
        try:
            first = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(first, nn.Conv2d):
            return first
    return None


def _in_channels(model: nn.Module) -> int:
    """The input channels the model takes (its declared first conv, else its first conv or linear)."""
    declared = _declared_first_conv(model)
    if declared is not None:
        return declared.in_channels
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return m.in_features
    return 3


def _input_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    """The conv that takes the input, for checking inputs: the declared first conv, else the first
    module if it is a conv (a user model whose first module is not one may take anything: ``None``)."""
    declared = _declared_first_conv(model)
    if declared is not None:
        return declared
    first = next((m for m in model.modules() if m is not model), None)
    return first if isinstance(first, nn.Conv2d) else None


def take_levels(indices: Sequence[int], num_levels: int) -> Tuple[FrozenSet[int], int]:
    """The start of every ``forward_levels`` / ``prune_levels``: the set of requested
    ``feature_info`` entries and the deepest one, checked (``ValueError`` if empty or out of range)."""
    take = frozenset(indices)
    if not take or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_levels for i in take):
        raise ValueError(f"levels {list(indices)!r}: need one or more ints in 0..{num_levels - 1} "
                         f"(normalise out_indices with normalize_out_indices first)")
    return take, max(take)


class FeatureExtractWrapper(nn.Module):
    """A backbone that returns the feature maps of the selected ``feature_info`` entries.

    ``FeatureExtractWrapper(model, out_indices)`` returns an instance of the one
    of its three subclasses that serves ``model``: :class:`LevelFeatures` if it
    implements ``forward_levels``, :class:`RewrittenFeatures` if it sets
    ``is_rewritten``, :class:`SequentialFeatures` otherwise.

    Attributes:
        out_indices: the selected entries, in the order outputs are returned.
        feature_info: :class:`FeatureInfo` of the selected entries, same order.
        out_channels: their channel counts (MindCV's name).
        full_state_keys: the complete model's ``state_dict`` keys, so a loader
            can tell "pruned here" from "unknown".

    The forward returns a list of NCHW tensors, one per selected entry.
    """

    def __new__(cls, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any) -> "FeatureExtractWrapper":
        # model is None when copy/pickle re-create an instance of the concrete subclass.
        if cls is FeatureExtractWrapper:
            if model is None:
                raise ValueError("FeatureExtractWrapper(model, out_indices): a model is required")
            if callable(getattr(model, "forward_levels", None)):
                cls = LevelFeatures
            elif getattr(model, "is_rewritten", False):
                cls = RewrittenFeatures
            else:
                cls = SequentialFeatures
        return super().__new__(cls)

    # Names are module paths, except for a model that computes its own levels: there they are labels.
    _names_are_modules = True

    def __init__(self, model: nn.Module, out_indices: Union[Sequence[int], str, None] = None,
                 model_name: Optional[str] = None, *, as_dict: bool = False,
                 level_names: Union[str, Sequence[str], None] = None, frozen_stages: int = -1,
                 norm_eval: bool = False):
        super().__init__()
        name = model_name or getattr(getattr(model, "default_cfg", None), "name", "") or type(model).__name__
        if not hasattr(model, "feature_info"):
            raise ValueError(f"{name} does not support features_only: it registers no feature_info")
        full_info = FeatureInfo(model.feature_info, name, module=model if self._names_are_modules else None)
        indices = normalize_out_indices(out_indices, full_info)
        selected = full_info.select(indices)
        if not isinstance(as_dict, bool):
            raise ValueError(f"{name}: as_dict must be True or False, got {as_dict!r}")
        if not isinstance(norm_eval, bool):
            raise ValueError(f"{name}: norm_eval must be True or False, got {norm_eval!r}")
        names = _level_names(level_names, selected, name)
        cfg = getattr(model, "default_cfg", None)
        stage_modules = tuple(getattr(cfg, "stage_modules", ()) or ())
        frozen_stages = check_frozen_stages(frozen_stages, num_stages(full_info.info, stage_modules), name)
        self._verify_declarations(model, full_info, cfg)
        frozen: set = set()
        if frozen_stages >= 0:
            # Read on the complete model, before anything is pruned: the stages' own forward.
            frozen = frozen_parameter_names(
                model, full_info.info, frozen_stages, lambda x, idx: self._levels_of(model, full_info, idx, x),
                probe_input_size(cfg), _in_channels(model), name, stage_modules)

        self.model_name = name
        self.out_indices = indices
        self.feature_info = selected
        self.out_channels = self.feature_info.channels()
        self.default_cfg = getattr(model, "default_cfg", None)
        self.as_dict = as_dict
        self.level_names = names
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._full_feature_info = full_info
        self._deepest_reduction = max(self.feature_info.reduction())
        self._whole_depth = self._deepest_reduction >= max(full_info.reduction())
        # Not a submodule attribute (that would add a state_dict key): a plain reference.
        object.__setattr__(self, "_input_conv", _input_conv(model))
        self.full_state_keys = frozenset(model.state_dict())
        self._prune(model, full_info, indices)
        for pname, p in model.named_parameters():
            if pname in frozen:
                p.requires_grad_(False)
        self._frozen_modules = frozen_modules(model, frozen)
        # Hold the model's own containers: state_dict keys stay the model's keys.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        object.__setattr__(self, "_backbone", model)
        self.train(model.training)

    @staticmethod
    def _levels_of(model: nn.Module, info: "FeatureInfo", indices: List[int], x: torch.Tensor) -> List[torch.Tensor]:
        """The entries ``indices`` (ascending) of the complete, unpruned ``model``."""
        raise NotImplementedError

    def _prune(self, model: nn.Module, info: FeatureInfo, indices: List[int]) -> None:
        """Drop what the selected outputs do not need (and remember how to compute them)."""
        raise NotImplementedError

    def _levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The selected entries, in ``out_indices`` order."""
        raise NotImplementedError

    # -- the wrap-time check of what the model declares ------------------------------------------
    def _verify_declarations(self, model: nn.Module, info: FeatureInfo, cfg: Any) -> None:
        """Check every entry's ``chs`` and ``reduction`` against one forward (two for an entry whose
        maps are smaller than ``ceil(size / reduction)``: unpadded layers), and what the kind of
        model needs of its forward. Passed declarations are remembered per architecture."""
        if type(model).__module__.startswith(_TESTED_FAMILIES):
            return
        key = _architecture_key(type(self), model, info, cfg)
        if key is not None and key in _VERIFIED:
            return
        side = probe_input_size(cfg)[0]
        in_chs = _in_channels(model)
        first = _probe(lambda x: self._probe_levels(model, info, x), model, side, in_chs)
        if first is None:
            return  # the model cannot run this probe (logged); its declarations stay unchecked
        second = None
        for i, (entry, out) in enumerate(zip(info, first)):
            _check_output(info, i, out, side)
            if "grid" in entry or out.shape[-2:] == _ceil_shape(side, entry["reduction"]):
                continue
            if second is None:
                step = math.lcm(*(e["reduction"] for e in info))
                step = math.lcm(step, *(r.modulus for r in getattr(cfg, "side_rules", ())))
                second = _probe(lambda x: self._probe_levels(model, info, x), model, side + step, in_chs)
                if second is None:
                    return
            grew = [b - a for a, b in zip(out.shape[-2:], second[i].shape[-2:])]
            if grew != [step // entry["reduction"]] * 2:
                raise ValueError(
                    f"{info.model_name}: feature_info[{i}] ({entry['name']!r}) declares reduction="
                    f"{entry['reduction']}, but its maps are {tuple(out.shape[-2:])} at {side} px and "
                    f"{tuple(second[i].shape[-2:])} at {side + step} px (a stride of {_stride(step, grew)}). "
                    f"Declared entries:\n{info.table()}")
        if key is not None:
            _VERIFIED.add(key)

    def _probe_levels(self, model: nn.Module, info: FeatureInfo, x: torch.Tensor) -> List[torch.Tensor]:
        """Every entry's output for the wrap-time check (the kind's own forward path)."""
        return self._levels_of(model, info, list(range(len(info))), x)

    def forward(self, x: torch.Tensor) -> Union[List[torch.Tensor], "OrderedDict[str, torch.Tensor]"]:
        # Not while tracing (FX proxies, dynamo/export): the graph is for inputs already checked.
        if not (torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy)):
            conv = self._input_conv
            check_input_tensor(self.model_name, x, conv.in_channels if conv is not None else None,
                               conv.weight.dtype if conv is not None else None)
            check_input_size(self.default_cfg, x, self.model_name, self._deepest_reduction, self._whole_depth)
        feats = self._levels(x)
        if self.as_dict:
            return OrderedDict(zip(self.level_names, feats))
        return feats

    def output_shape(self) -> "OrderedDict[str, ShapeSpec]":
        """``{level name: ShapeSpec(channels, stride)}`` in output order (detectron2's ``Backbone.output_shape``)."""
        return OrderedDict((n, ShapeSpec(channels=e["chs"], stride=e["reduction"]))
                           for n, e in zip(self.level_names, self.feature_info))

    def train(self, mode: bool = True) -> "FeatureExtractWrapper":
        self._backbone.train(mode)
        self.training = mode
        apply_eval_modes(self._backbone, getattr(self, "_frozen_modules", ()), getattr(self, "norm_eval", False))
        return self

    def extra_repr(self) -> str:
        extra = f", frozen_stages={self.frozen_stages}" if self.frozen_stages >= 0 else ""
        extra += ", norm_eval=True" if self.norm_eval else ""
        extra += ", as_dict=True" if self.as_dict else ""
        return f"model={self.model_name}, out_indices={self.out_indices}{extra}"


# Architectures whose declarations passed the wrap-time check (see _architecture_key).
_VERIFIED: Set[Tuple[Any, ...]] = set()
# Model classes from these modules are checked by the test suite, not at wrap time.
_TESTED_FAMILIES: Tuple[str, ...] = ("featurezoo.models.",)
_PLAIN = (bool, int, float, str, type(None))


def _architecture_key(kind: type, model: nn.Module, info: FeatureInfo, cfg: Any) -> Optional[Tuple[Any, ...]]:
    """What the check's verdict depends on: the wrapper kind, the model class, its declarations, its
    module tree with every tensor's shape, and its size facts. ``None`` (no caching) for a model
    whose class defines no stable identity (a class made in a function may be re-made with other code)."""
    cls = type(model)
    if "<locals>" in cls.__qualname__:
        return None
    tree = tuple((n, type(m).__name__,
                  tuple((k, tuple(t.shape)) for k, t in list(m._parameters.items()) + list(m._buffers.items())
                        if t is not None),
                  tuple((k, v) for k, v in vars(m).items()
                        if isinstance(v, _PLAIN) or isinstance(v, tuple) and all(isinstance(u, _PLAIN) for u in v)))
                 for n, m in model.named_modules())
    facts = (getattr(cfg, "input_sides", ()), getattr(cfg, "min_input_size", None), getattr(cfg, "side_rules", ()),
             getattr(cfg, "valid_padding", ""))
    return (kind, cls.__module__, cls.__qualname__, repr(info.info), tree, facts)


class _Probe:
    """Eval mode, no gradients, then each module's own training flag back."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.grad = torch.is_grad_enabled()
        self.model.eval()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        torch.set_grad_enabled(self.grad)
        for m, flag in self.flags:
            m.training = flag


@contextlib.contextmanager
def _weights_on_meta(model: nn.Module) -> Iterator[None]:
    """Every parameter and buffer swapped for a meta tensor of its shape (tied ones stay tied),
    and put back afterwards whatever happens: a forward for shapes only, no arithmetic."""
    saved: List[Tuple[Dict[str, Any], str, torch.Tensor]] = []
    memo: Dict[int, torch.Tensor] = {}
    try:
        for m in model.modules():
            for store in (m._parameters, m._buffers):
                for k, v in list(store.items()):
                    if v is None or v.is_meta:
                        continue
                    if id(v) not in memo:
                        meta = torch.empty_like(v, device="meta")
                        memo[id(v)] = nn.Parameter(meta, v.requires_grad) if isinstance(v, nn.Parameter) else meta
                    saved.append((store, k, v))
                    store[k] = memo[id(v)]
        yield
    finally:
        for store, k, v in saved:
            store[k] = v


def _probe(run: Any, model: nn.Module, side: int, in_chs: int) -> Optional[List[torch.Tensor]]:
    """``run`` on one ``side`` x ``side`` input: on the meta device (weights swapped for meta tensors),
    else, for a model that cannot run there (tensors held outside its parameters and buffers), on its
    own device. ``None`` (logged) if neither runs."""
    conv = _input_conv(model)
    first = conv.weight if conv is not None else next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    failure = None
    for where in ("meta", device):
        x = torch.zeros(1, in_chs, side, side, device=where, dtype=dtype)
        try:
            with _Probe(model), (_weights_on_meta(model) if where == "meta" else contextlib.nullcontext()):
                return list(run(x))
        except ValueError:
            raise
        except Exception as err:  # a forward that cannot run on this probe: nothing to compare against
            failure = err
        if first is None or first.is_meta:
            break
    _logger.warning("%s: feature_info not checked against a forward at %d px (%s: %s)", type(model).__name__,
                    side, type(failure).__name__, str(failure).splitlines()[0][:200] if str(failure) else "")
    return None


def _ceil_shape(side: int, reduction: int) -> torch.Size:
    return torch.Size([-(-side // reduction)] * 2)


def _stride(step: int, grew: Sequence[int]) -> str:
    return "/".join(str(step // g) if g > 0 else "?" for g in grew)


def _check_output(info: FeatureInfo, i: int, out: Any, side: int) -> None:
    entry = info[i]
    where = f"{info.model_name}: feature_info[{i}] ({entry['name']!r})"
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        got = f"a {out.dim()}-d tensor {tuple(out.shape)}" if isinstance(out, torch.Tensor) else \
            f"a {type(out).__name__}"
        raise ValueError(f"{where}: the forward gives {got} at {side} px, not an NCHW map. Declared entries:\n"
                         f"{info.table()}")
    if out.shape[1] != entry["chs"]:
        raise ValueError(f"{where} declares chs={entry['chs']}, but the module outputs {out.shape[1]} channels "
                         f"(shape {tuple(out.shape)} at {side} px). Declared entries:\n{info.table()}")


class _StopProbe(Exception):
    """Raised by the probe's hook once the deepest feature module has run."""


class SequentialFeatures(FeatureExtractWrapper):
    """The guide's scenarios 1 and 2: the model's forward is its top-level children
    called in registration order, each once (as torchvision's ``IntermediateLayerGetter``
    assumes). Containers holding a feature are entered if they are ``nn.Sequential``."""

    def _prune(self, model: nn.Module, info: FeatureInfo, indices: List[int]) -> None:
        names = [info.module_name(i) for i in indices]
        self._steps = _sequential_plan(model, names, self.model_name)
        _prune_after(model, self._steps)
        self._capture = {n: pos for pos, n in enumerate(names)}
        self._to_nchw = {n for n, i in zip(names, indices) if info[i].get("fmt", "NCHW") == "NHWC"}

    @staticmethod
    def _run(steps: List[Tuple[str, nn.Module]], capture: Mapping[str, int], to_nchw: Set[str], count: int,
             x: torch.Tensor) -> List[torch.Tensor]:
        out: List[Optional[torch.Tensor]] = [None] * count
        for name, module in steps:
            x = module(x)
            pos = capture.get(name)
            if pos is not None:
                out[pos] = x.permute(0, 3, 1, 2) if name in to_nchw else x
        return out  # type: ignore[return-value]

    @staticmethod
    def _levels_of(model: nn.Module, info: FeatureInfo, indices: List[int], x: torch.Tensor) -> List[torch.Tensor]:
        names = [info.module_name(i) for i in indices]
        steps = _sequential_plan(model, names, info.model_name)
        to_nchw = {n for n, i in zip(names, indices) if info[i].get("fmt", "NCHW") == "NHWC"}
        return SequentialFeatures._run(steps, {n: p for p, n in enumerate(names)}, to_nchw, len(names), x)

    def _levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self._run(self._steps, self._capture, self._to_nchw, len(self.out_indices), x)

    def _probe_levels(self, model: nn.Module, info: FeatureInfo, x: torch.Tensor) -> List[torch.Tensor]:
        """Every entry's output, read by hooks from the model's *own* forward, which must be the chain
        the wrapper runs: the plan's modules each called once, in order, each on the previous one's
        output (the first on the input). What it cannot serve (a module called twice or never, work
        between modules) is a ``ValueError``. The forward stops once the deepest feature module ran."""
        names = info.module_name()
        steps = _sequential_plan(model, names, info.model_name)
        calls: List[Tuple[str, Any, Any]] = []
        last = steps[-1][0]

        def hook(name: str) -> Any:
            def record(module: nn.Module, args: Any, out: Any) -> None:
                calls.append((name, args[0] if args else None, out))
                if name == last:
                    raise _StopProbe
            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in steps]
        try:
            model(x)
        except _StopProbe:
            pass
        finally:
            for h in handles:
                h.remove()
        _check_chain(info.model_name, [n for n, _ in steps], calls, x)
        outs = {name: out for name, _, out in calls}
        nhwc = {e["name"] for e in info if e.get("fmt", "NCHW") == "NHWC"}
        return [outs[n].permute(0, 3, 1, 2) if n in nhwc and isinstance(outs[n], torch.Tensor) else outs[n]
                for n in names]


def _check_chain(model_name: str, plan: List[str], calls: List[Tuple[str, Any, Any]], x: torch.Tensor) -> None:
    """The recorded calls are exactly ``plan``, in order, each fed the previous output."""
    order = [name for name, _, _ in calls]
    hint = ("the sequential strategy runs the top-level modules (entering nn.Sequential containers) in "
            "registration order, each once, on the previous one's output; give the model forward_levels / "
            "prune_levels or is_rewritten = True")
    seen: Set[str] = set()
    for name in order:
        if name in seen:
            raise ValueError(f"{model_name}: its forward calls {name!r} more than once; {hint}")
        seen.add(name)
    if order != plan:
        skipped = [n for n in plan if n not in seen]
        what = (f"never calls {skipped}" if skipped and order == [n for n in plan if n in seen]
                else f"calls the modules in the order {order}, not their registration order {plan}")
        raise ValueError(f"{model_name}: its forward {what}; {hint}")
    previous: Any = x
    for name, given, out in calls:
        if given is not previous:
            before = "the input" if previous is x else f"the output of the module before {name!r}"
            raise ValueError(f"{model_name}: its forward does not feed {before} straight into {name!r} (there is "
                             f"work between the modules, which the wrapper would skip); {hint}")
        previous = out


class LevelFeatures(FeatureExtractWrapper):
    """Models that compute their own levels (``forward_levels`` / ``prune_levels``):
    one forward path shared with the classifier, stopped at the deepest level asked for."""

    _names_are_modules = False

    def _prune(self, model: nn.Module, info: FeatureInfo, indices: List[int]) -> None:
        self._order = sorted(indices)
        self._position = [self._order.index(i) for i in indices]
        model.prune_levels(self._order)

    @staticmethod
    def _levels_of(model: nn.Module, info: FeatureInfo, indices: List[int], x: torch.Tensor) -> List[torch.Tensor]:
        return model.forward_levels(x, indices)

    def _levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self._backbone.forward_levels(x, self._order)
        return [feats[p] for p in self._position]


class RewrittenFeatures(FeatureExtractWrapper):
    """The guide's scenario 3 (``is_rewritten = True``): ``forward_features`` returns one
    tensor per ``feature_info`` entry; the classifier named by the cfg is dropped."""

    def _prune(self, model: nn.Module, info: FeatureInfo, indices: List[int]) -> None:
        cfg = getattr(model, "default_cfg", None)
        for head in getattr(cfg, "classifier_names", ()):
            parent, _, leaf = head.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if leaf in owner._modules:
                del owner._modules[leaf]

    @staticmethod
    def _rewritten_levels(model: nn.Module, info: FeatureInfo, x: torch.Tensor) -> Sequence[torch.Tensor]:
        feats = model.forward_features(x)
        if not isinstance(feats, (list, tuple)) or len(feats) != len(info):
            got = f"{len(feats)} tensors" if isinstance(feats, (list, tuple)) else f"a {type(feats).__name__}"
            raise ValueError(
                f"{info.model_name}: forward_features returned {got} but feature_info has "
                f"{len(info)} entries; an is_rewritten model must return a list with one "
                f"tensor per entry"
            )
        return feats

    @staticmethod
    def _levels_of(model: nn.Module, info: FeatureInfo, indices: List[int], x: torch.Tensor) -> List[torch.Tensor]:
        feats = RewrittenFeatures._rewritten_levels(model, info, x)
        return [feats[i] for i in indices]

    def _levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self._rewritten_levels(self._backbone, self._full_feature_info, x)
        return [feats[i] for i in self.out_indices]


def get_feature_info(model_name: str, out_indices: Union[Sequence[int], str, None] = None,
                     **kwargs: Any) -> FeatureInfo:
    """Feature info of a registered model, read from a build on the meta device
    (no weights allocated, so it is cheap even for the largest variants)."""
    return build_on_meta(model_name, features_only=True, out_indices=out_indices, **kwargs).feature_info
