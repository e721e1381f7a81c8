"""Discovery: any image model becomes a featurezoo backbone, with no ``feature_info`` written by hand.

:func:`wrap` finds a model's pyramid by itself and returns the same
:class:`~featurezoo.features.FeatureExtractWrapper` contract the zoo's models give
(``feature_info`` with channels and strides, ``out_indices`` including
``"pyramid"``, ``out_channels``, ``as_dict``/``level_names``/``output_shape()``,
``frozen_stages``, ``norm_eval``), NCHW outputs, and nothing computed past the
deepest level asked for.

The rule, one for every method:

1. **Trace** the model: ``torch.fx`` symbolic tracing (standard ``torch.nn``
   layers stay leaves; the model's own modules are traced through), or, where
   FX fails (Python control flow on values, as in Hugging Face models),
   ``torch.export`` (non-strict). Where both fail, the model is run once on a
   probe input while a ``TorchFunctionMode`` records every tensor operation,
   and forward hooks on its modules record which module returned which
   tensor (``method="hooks"``).
2. **Shapes**: every value is propagated at the probe size (fake tensors; no
   compute) and, if the model accepts it, at a second, larger and non-square
   size. A 4-d value is a map when two dimensions follow the input: NCHW
   (dims 2, 3) or channels-last NHWC (dims 1, 2, Swin-like). A 3-d value
   ``(B, N, C)`` is a token map when ``N - p`` is the grid
   ``ceil(H/r) * ceil(W/r)`` for ``p`` prefix (class/register) tokens, which
   are dropped. Global pools (1x1, or a size that does not follow the input)
   are not maps. The reduction is ``input side / map side`` rounded (with two
   probes: the side difference over the map-side difference, which is the
   nominal stride also for unpadded convolutions).
3. **Dominators**: the levels are values that every data path from the input
   to the model's output passes through (a ResNet block's output after its
   residual add, never a node inside one of its branches); reading a shape is
   not a data path. Among them, the maps up to the last one at the largest
   reduction; of those, the last one at each distinct reduction.
4. **Prune**: the graph is cut to what the selected levels need (the classifier
   and everything past the deepest level are gone). The pruned graph is the
   model's own operations on the model's own modules, under their own names:
   ``state_dict()`` keys are the model's keys for what is kept, so the
   model's checkpoint loads, and outputs are bit-identical to the model's
   activations. With hooks, the model runs its own forward and stops (an
   exception from the hook) after the deepest level; modules first called
   after it are removed from the model.

Every ``feature_info`` entry says how it was found: ``method`` (``"fx"``,
``"export"`` or ``"hooks"``), ``layout`` (``"NCHW"``, ``"NHWC"``, ``"tokens"``)
and, for tokens, ``prefix_tokens``. ``name`` is the outermost module that
returns the value (``"layer1"``), else the graph node's name (``"relu"`` for a
functional ReLU).

Limits: a traced graph fixes the model's Python control flow as it went at the
probe (FX refuses control flow on values; export and hooks record the branch
taken), so a model whose path depends on the input's values or size needs the
probe size it will run at; a model whose stride depends on the input size
(adaptive pooling to a fixed grid) has no levels past that pool.

Layer: with :mod:`featurezoo.models` and :mod:`featurezoo.detection`; imports
:mod:`featurezoo.cfg` and :mod:`featurezoo.features`.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .cfg import ModelCfg
from .features import FeatureExtractWrapper, take_levels

__all__ = ["wrap", "discover", "Discovery", "import_factory", "is_factory_path", "METHODS", "LAYOUTS"]

_logger = logging.getLogger(__name__)

METHODS = ("fx", "export", "hooks")
LAYOUTS = ("NCHW", "NHWC", "tokens")
# The second probe adds this many pixels to the height and twice as many to the width: a multiple of 32
# (stride-32 maps grow by whole cells) and non-square (a channels-last map is told from an NCHW one).
_PROBE_STEP = 32
_MAX_PREFIX_TOKENS = 16
_MAX_REDUCTION = 128


# -- the value at a node --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Map:
    """How a value is a feature map: its layout, channels, reduction and prefix tokens."""

    layout: str
    chs: int
    reduction: int
    prefix: int = 0


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value``, walking nested mappings, lists and tuples in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _has_tensor(value: Any) -> bool:
    return next(_tensors(value), None) is not None


def _side_reduction(side: int, out: int) -> Optional[int]:
    """``side / out`` rounded, if ``out`` is a plausible map side at that reduction (unpadded
    convolutions lose a few pixels; a channel count is not a side)."""
    if out < 1:
        return None
    r = max(1, round(side / out))
    return r if abs(side / r - out) <= 0.1 * out + 1 else None


def _grid_reduction(size_a: Tuple[int, int], hw_a: Tuple[int, int], size_b: Optional[Tuple[int, int]],
                    hw_b: Optional[Tuple[int, int]]) -> Optional[int]:
    """The reduction of a map of spatial size ``hw_a`` at input ``size_a`` (and ``hw_b`` at ``size_b``)."""
    if hw_b is not None:
        dh, dw = hw_b[0] - hw_a[0], hw_b[1] - hw_a[1]
        if dh <= 0 or dw <= 0:
            return None  # a global pool or a fixed-size output: it does not follow the input
        rh, rw = round((size_b[0] - size_a[0]) / dh), round((size_b[1] - size_a[1]) / dw)
        return rh if rh == rw and rh >= 1 else None
    if hw_a == (1, 1):
        return None
    rh, rw = _side_reduction(size_a[0], hw_a[0]), _side_reduction(size_a[1], hw_a[1])
    return rh if rh is not None and rh == rw else None


def _token_grid(n_a: int, size_a: Tuple[int, int], n_b: Optional[int], size_b: Optional[Tuple[int, int]]
                ) -> Optional[Tuple[int, int]]:
    """``(reduction, prefix tokens)`` such that ``n - prefix`` tokens form the ``ceil(H/r) x ceil(W/r)`` grid."""
    for r in range(1, _MAX_REDUCTION + 1):
        prefix = n_a - math.ceil(size_a[0] / r) * math.ceil(size_a[1] / r)
        if prefix < 0 or prefix > _MAX_PREFIX_TOKENS:
            continue
        if n_b is not None and n_b - math.ceil(size_b[0] / r) * math.ceil(size_b[1] / r) != prefix:
            continue
        return r, prefix
    return None


def _as_map(value_a: Any, size_a: Tuple[int, int], value_b: Any = None,
            size_b: Optional[Tuple[int, int]] = None) -> Optional[_Map]:
    """The map a value is, from its shape at one or two probe sizes; ``None`` if it is not one."""
    if not isinstance(value_a, torch.Tensor) or value_a.dim() not in (3, 4) or not value_a.is_floating_point() \
            or value_a.shape[0] != 1:
        return None  # the probe's batch is 1: (B * windows, ...) values are not maps
    a = tuple(value_a.shape)
    b = tuple(value_b.shape) if isinstance(value_b, torch.Tensor) and value_b.dim() == value_a.dim() else None
    if value_a.dim() == 4:
        candidates = []
        for layout, (i, j, c) in (("NCHW", (2, 3, 1)), ("NHWC", (1, 2, 3))):
            if b is not None and (b[c] != a[c] or b[0] != a[0]):
                continue
            r = _grid_reduction(size_a, (a[i], a[j]), size_b if b else None, (b[i], b[j]) if b else None)
            if r is not None:
                candidates.append(_Map(layout, a[c], r))
        # One probe at a square size cannot tell (B, C, C, C) apart: NCHW, the PyTorch convention, wins.
        return candidates[0] if candidates else None
    if b is not None and (b[2] != a[2] or b[1] == a[1]):
        return None
    found = _token_grid(a[1], size_a, b[1] if b else None, size_b if b else None)
    if found is None:
        return None
    return _Map("tokens", a[2], found[0], found[1])


def _to_nchw(x: torch.Tensor, m: _Map, size: Tuple[int, int], name: str) -> torch.Tensor:
    if m.layout == "NCHW":
        return x
    if m.layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    h, w = math.ceil(size[0] / m.reduction), math.ceil(size[1] / m.reduction)
    if x.shape[1] - m.prefix != h * w:
        raise RuntimeError(f"level {name!r}: {x.shape[1]} tokens ({m.prefix} prefix) do not form the {h}x{w} grid "
                           f"of a {size[0]}x{size[1]} input at reduction {m.reduction}")
    return x[:, m.prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


# -- dominators ----------------------------------------------------------------------------------
def _dominators(order: Sequence[Any], preds: Mapping[Any, Sequence[Any]], entry: Any, sink: Any
                ) -> Tuple[List[Any], Set[Any]]:
    """The nodes every path from ``entry`` to ``sink`` passes through, in order (``entry`` and
    ``sink`` included), and the nodes reached from ``entry``. ``order`` is topological; ``preds``
    the data predecessors of each node."""
    pos = {n: i for i, n in enumerate(order)}
    idom: Dict[Any, Any] = {entry: entry}
    for n in order:
        if n is entry:
            continue
        ps = [p for p in preds.get(n, ()) if p in idom]
        if not ps:
            continue  # not reached from the input
        d = ps[0]
        for p in ps[1:]:
            a, b = d, p
            while a is not b:
                while pos[a] > pos[b]:
                    a = idom[a]
                while pos[b] > pos[a]:
                    b = idom[b]
            d = a
        idom[n] = d
    if sink not in idom:
        return [], set(idom)
    chain = [sink]
    while chain[-1] is not entry:
        chain.append(idom[chain[-1]])
    return chain[::-1], set(idom)


def _select(chain: Sequence[Any], reached: Set[Any], map_of: Callable[[Any], Optional[_Map]],
            scopes: Mapping[Any, Sequence[str]], preds: Mapping[Any, Sequence[Any]]) -> List[Any]:
    """The levels among the dominators ``chain``: the maps up to the last one at the largest
    reduction, and of those the last at each distinct reduction, in order.

    A module that changes the reduction is one step: what it computes before its stride
    (a MobileNet block's expansion conv, ConvNeXt's downsampling norm) is not a level; the
    level is that module's input. Such a module is the outermost one around the next
    level's first map whose one data input is at this level's reduction and whose output is
    at the next level's.
    """
    found = [n for n in chain[1:-1] if map_of(n) is not None]
    if not found:
        return []
    deepest = max(map_of(n).reduction for n in found)
    found = found[:max(i for i, n in enumerate(found) if map_of(n).reduction == deepest) + 1]
    last: Dict[int, Any] = {}
    for n in found:
        last[map_of(n).reduction] = n
    members: Dict[str, List[Any]] = {}
    for n in preds:
        for path in scopes.get(n, ()):
            members.setdefault(path, []).append(n)
    pos = {n: i for i, n in enumerate(preds) if n in reached}
    on_chain = set(found)
    levels = []
    for r, n in sorted(last.items(), key=lambda kv: found.index(kv[1])):
        i = found.index(n)
        if i + 1 < len(found):
            nxt = found[i + 1]
            step = _step_input(nxt, r, map_of(nxt).reduction, map_of, scopes, members, preds, pos)
            if step is not None and step in on_chain:
                n = step
        levels.append(n)
    return levels


def _step_input(first: Any, r: int, r_next: int, map_of: Callable[[Any], Optional[_Map]],
                scopes: Mapping[Any, Sequence[str]], members: Mapping[str, List[Any]],
                preds: Mapping[Any, Sequence[Any]], pos: Mapping[Any, int]) -> Optional[Any]:
    """The input of the outermost module around ``first`` that takes one data input at reduction
    ``r`` and returns a map at ``r_next``; ``None`` if there is none."""
    for path in scopes.get(first, ()):
        inside = set(members.get(path, ()))
        inputs = {a for x in inside for a in preds.get(x, ()) if a not in inside and a in pos
                  and map_of(a) is not None}
        if len(inputs) != 1:
            continue
        (source,) = inputs
        outs = sorted((x for x in inside if map_of(x) is not None), key=lambda x: pos[x])
        if outs and map_of(source).reduction == r and map_of(outs[-1]).reduction == r_next:
            return source
    return None


# -- tracing ------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Standard ``torch.nn`` layers stay leaves; records the outermost module that returns each value."""

    def __init__(self) -> None:
        super().__init__()
        self.returned_by: Dict[fx.Node, str] = {}

    def call_module(self, m: nn.Module, forward: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.returned_by[out.node] = self.path_of_module(m)  # an enclosing module overwrites it later
        return out


def _concrete_args(model: nn.Module) -> Dict[str, Any]:
    """Every forward argument after the image, fixed at its default (``output_hidden_states=None``, ...)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _trace_fx(model: nn.Module) -> Tuple[fx.GraphModule, Dict[fx.Node, str]]:
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args=_concrete_args(model) or None)
    gm = fx.GraphModule(tracer.root, graph)
    return gm, {n: name for n, name in tracer.returned_by.items() if name}


def _trace_export(model: nn.Module, x: torch.Tensor) -> Tuple[fx.GraphModule, Dict[fx.Node, str]]:
    from torch.export import Dim, export

    try:  # sizes free where the model allows it, so the backbone runs at other sizes too
        ep = export(model, (x,), dynamic_shapes=({2: Dim.AUTO, 3: Dim.AUTO},), strict=False)
    except Exception:  # noqa: BLE001 - any failure: the static export below reports its own
        ep = export(model, (x,), strict=False)
    gm = ep.module()
    # The value a module returns is the last node recorded in its scope; the outermost such module names it.
    last_in: Dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                last_in[path] = node
    returned_by: Dict[fx.Node, str] = {}
    for path in sorted(last_in, key=lambda p: -p.count(".")):
        returned_by[last_in[path]] = path
    return gm, returned_by


def _shape_only(value: Any) -> Any:
    """``value`` with every tensor replaced by a meta tensor of its shape (the probe's activations are freed)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, Mapping):
        return {k: _shape_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shape_only(v) for v in value]
    return value


def _propagate(gm: fx.GraphModule, x: torch.Tensor) -> Dict[fx.Node, Any]:
    """Every node's value (as shapes: meta tensors) for input ``x``.

    A real run where the model's weights are real: on a CPU at the sizes discovery probes,
    computing is faster than fake or meta tensors, whose per-operation cost is high.
    """
    values: Dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            v = super().run_node(n)
            values[n] = _shape_only(v)
            return v

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def _graph_preds(graph: fx.Graph, carries: Set[fx.Node]) -> Dict[fx.Node, List[fx.Node]]:
    """Data predecessors: an edge carries a tensor (or a container of tensors); shapes are not data."""
    return {n: [a for a in n.all_input_nodes if a in carries] for n in graph.nodes
            if n in carries or n.op == "output"}


# -- the hooks method ---------------------------------------------------------------------------
class _OpRecorder(TorchFunctionMode):
    """Records each torch operation as a node whose inputs are the operations that made its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.made_by: Dict[int, int] = {}  # id(tensor) -> op index that produced it last
        self.preds: List[List[int]] = []
        self.stack: List[str] = []  # the module paths being run (maintained by hooks)
        self.scopes: List[Tuple[str, ...]] = []
        self.values: List[Any] = []
        self.keep: List[Any] = []  # holds every tensor, so that ids are not reused

    def node_of(self, t: torch.Tensor) -> Optional[int]:
        return self.made_by.get(id(t))

    def add_input(self, x: torch.Tensor) -> int:
        self.preds.append([])
        self.scopes.append(())
        self.values.append(x)
        self.keep.append(x)
        self.made_by[id(x)] = 0
        return 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _has_tensor(out):
            return out
        ins: List[int] = []
        for t in _tensors((args, kwargs)):
            i = self.made_by.get(id(t))
            if i is not None and i not in ins:
                ins.append(i)
        if not ins:
            return out  # a constant or a parameter: not data from the input
        idx = len(self.preds)
        self.preds.append(ins)
        self.scopes.append(tuple(self.stack))
        self.values.append(out)
        self.keep.append(out)

        def mark(v: Any) -> None:
            if isinstance(v, torch.Tensor):
                self.made_by[id(v)] = idx
            elif isinstance(v, (list, tuple)):
                for u in v:
                    mark(u)

        mark(out)
        return out


class _Stop(Exception):
    """Raised by the hook of the deepest level: nothing after it is computed."""


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _run_hooks_probe(model: nn.Module, size: Tuple[int, int], in_chans: int):
    """Run ``model`` once, recording operations and which module returned what.

    Returns ``(recorder, sink, returned_by {op: (module path, call index)}, first_call {path: op index
    count when first called})``.
    """
    rec = _OpRecorder()
    paths = {m: p for p, m in model.named_modules() if p}
    calls: Dict[str, int] = {}
    returned_by: Dict[int, Tuple[str, int]] = {}
    first_call: Dict[str, int] = {}

    def pre(m: nn.Module, args: Any) -> None:
        first_call.setdefault(paths[m], len(rec.preds))
        rec.stack.append(paths[m])

    def post(m: nn.Module, args: Any, out: Any) -> None:
        path = paths[m]
        if rec.stack and rec.stack[-1] == path:
            rec.stack.pop()
        k = calls.get(path, 0)
        calls[path] = k + 1
        if isinstance(out, torch.Tensor):
            i = rec.node_of(out)
            if i is not None:
                returned_by[i] = (path, k)  # an enclosing module's hook runs later and overwrites

    handles = [m.register_forward_pre_hook(pre) for m in paths] + [m.register_forward_hook(post) for m in paths]
    x = torch.randn(1, in_chans, *size, device=_model_device(model))
    try:
        with torch.no_grad(), rec:
            rec.add_input(x)
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    sink = len(rec.preds)
    outs: List[int] = []
    for t in _tensors(out):
        i = rec.node_of(t)
        if i is not None and i not in outs:
            outs.append(i)
    rec.preds.append(outs)
    return rec, sink, returned_by, first_call


# -- the levels models that FeatureExtractWrapper serves -----------------------------------------
def _share(owner: nn.Module, source: nn.Module) -> None:
    """``owner`` holds ``source``'s modules, parameters and buffers under their own names."""
    owner._modules = source._modules
    owner._parameters = source._parameters
    owner._buffers = source._buffers
    owner._non_persistent_buffers_set = source._non_persistent_buffers_set


class _GraphLevels(nn.Module):
    """The levels of a traced model (fx or export): a GraphModule that outputs the levels.

    ``forward_levels`` / ``prune_levels`` as :class:`~featurezoo.features.LevelFeatures` expects;
    the GraphModule's modules are this module's, under the model's own names.
    """

    def __init__(self, source: fx.GraphModule, nodes: Sequence[fx.Node], maps: Sequence[_Map],
                 info: List[Dict[str, Any]], cfg: ModelCfg, non_persistent: Set[str]):
        super().__init__()
        self.feature_info = info
        self.default_cfg = cfg
        self._maps = list(maps)
        self._computed = list(range(len(nodes)))
        object.__setattr__(self, "_gm", _pruned_module(source, nodes, non_persistent))
        # kept until prune_levels: the complete traced model, to cut again from
        object.__setattr__(self, "_source", (source, list(nodes), non_persistent))
        _share(self, self._gm)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        take, _ = take_levels(indices, len(self.feature_info))
        outs = self._gm(x)
        size = (x.shape[-2], x.shape[-1])
        return [_to_nchw(outs[self._computed.index(i)], self._maps[i], size, self.feature_info[i]["name"])
                for i in sorted(take)]

    def prune_levels(self, indices: Sequence[int]) -> None:
        take, _ = take_levels(indices, len(self.feature_info))
        if self._source is None:
            raise RuntimeError("prune_levels was called already; discover again to cut another backbone")
        source, nodes, non_persistent = self._source
        self._computed = sorted(take)
        object.__setattr__(self, "_gm", _pruned_module(source, [nodes[i] for i in self._computed], non_persistent))
        object.__setattr__(self, "_source", None)
        _share(self, self._gm)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_levels(x, self._computed)


def _pruned_module(source: fx.GraphModule, wanted: Sequence[fx.Node], non_persistent: Set[str]) -> fx.GraphModule:
    """A GraphModule computing only what the ``wanted`` nodes of ``source``'s graph need, and returning them.

    Its submodules, parameters and buffers are ``source``'s (the same objects) under the same names;
    buffers the model does not save stay out of ``state_dict()`` as in the model.
    """
    graph = source.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    deepest = max(order[n] for n in wanted)
    # Operations run for their effect (in-place updates, asserts) before the deepest level stay.
    effects = [n for n in graph.nodes if not n.users and n.op not in ("placeholder", "output")
               and order[n] < deepest]
    needed: Set[fx.Node] = set()
    stack = list(wanted) + effects
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    new = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = new.node_copy(n, lambda a: env[a])
    new.output(tuple(env[n] for n in wanted))
    gm = fx.GraphModule(source, new)
    for name, module in gm.named_modules():
        for buf in list(module._buffers):
            if (f"{name}.{buf}" if name else buf) in non_persistent:
                module._non_persistent_buffers_set.add(buf)
    return gm


class _HookLevels(nn.Module):
    """The levels of a model that could not be traced: its own forward, with hooks that capture
    each level and stop the forward after the deepest one."""

    def __init__(self, model: nn.Module, taps: Sequence[Tuple[str, int]], maps: Sequence[_Map],
                 first_call: Mapping[str, int], tap_time: Sequence[int], info: List[Dict[str, Any]],
                 cfg: ModelCfg):
        super().__init__()
        self.feature_info = info
        self.default_cfg = cfg
        self._taps = list(taps)
        self._maps = list(maps)
        self._first_call = dict(first_call)
        self._tap_time = list(tap_time)
        object.__setattr__(self, "_model", model)
        _share(self, model)
        self._state: Optional[Dict[str, Any]] = None
        by_module: Dict[str, List[int]] = {}
        for i, (path, _) in enumerate(self._taps):
            by_module.setdefault(path, []).append(i)
        for path, levels in by_module.items():
            model.get_submodule(path).register_forward_hook(self._hook(path, levels))

    def _hook(self, path: str, levels: List[int]) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            state = self._state
            if state is None:
                return
            k = state["calls"].get(path, 0)
            state["calls"][path] = k + 1
            for i in levels:
                if self._taps[i][1] == k and i in state["want"]:
                    state["got"][i] = out
                    if len(state["got"]) == len(state["want"]):
                        raise _Stop
        return hook

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        take, _ = take_levels(indices, len(self.feature_info))
        self._state = {"calls": {}, "got": {}, "want": set(take)}
        try:
            self._model(x)
        except _Stop:
            pass
        finally:
            got, self._state = self._state["got"], None
        missing = sorted(take - set(got))
        if missing:
            raise RuntimeError(f"levels {[self.feature_info[i]['name'] for i in missing]} were not reached: the "
                               f"model's forward took another path than at discovery")
        size = (x.shape[-2], x.shape[-1])
        return [_to_nchw(got[i], self._maps[i], size, self.feature_info[i]["name"]) for i in sorted(take)]

    def prune_levels(self, indices: Sequence[int]) -> None:
        take, deepest = take_levels(indices, len(self.feature_info))
        stop = self._tap_time[deepest]
        needed = {p for p, t in self._first_call.items() if t <= stop}
        for path, t in sorted(self._first_call.items(), key=lambda kv: kv[0].count(".")):
            if path in needed or any(n.startswith(path + ".") for n in needed):
                continue
            parent, _, leaf = path.rpartition(".")
            try:
                owner = self._model.get_submodule(parent) if parent else self._model
            except AttributeError:
                continue  # an enclosing module is gone already
            if leaf in owner._modules:
                del owner._modules[leaf]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_levels(x, range(len(self.feature_info)))


# -- discovery ----------------------------------------------------------------------------------
def _check_input_size(input_size: Any) -> Tuple[int, int, int]:
    ok = isinstance(input_size, (list, tuple)) and len(input_size) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    if not ok:
        raise ValueError(f"input_size must be (channels, height, width) of positive ints, e.g. (3, 224, 224), "
                         f"got {input_size!r}")
    return tuple(input_size)  # type: ignore[return-value]


def _second_size(size: Tuple[int, int]) -> Tuple[int, int]:
    return size[0] + _PROBE_STEP, size[1] + 2 * _PROBE_STEP


def _non_persistent_buffers(model: nn.Module) -> Set[str]:
    return {f"{p}.{b}" if p else b for p, m in model.named_modules() for b in m._non_persistent_buffers_set}


@dataclass
class Discovery:
    """What discovery found in a model: its levels and how to build backbones from them.

    ``info`` is the full ``feature_info`` (one entry per level); :meth:`backbone`
    builds a :class:`~featurezoo.features.FeatureExtractWrapper` (several times for
    a traced model; once for the hooks method, which prunes the model in place).
    """

    model_name: str
    method: str
    info: List[Dict[str, Any]]
    cfg: ModelCfg
    full_state_keys: FrozenSet[str]
    _make: Callable[[], nn.Module] = field(repr=False)
    _used: bool = field(default=False, repr=False)
    failures: Dict[str, str] = field(default_factory=dict)

    def backbone(self, out_indices: Union[Sequence[int], str, None] = None, **kwargs: Any) -> FeatureExtractWrapper:
        if self.method == "hooks" and self._used:
            raise ValueError(f"{self.model_name}: a backbone found with forward hooks prunes the model in place; "
                             f"discover again on a fresh model to build another one")
        self._used = True
        wrapper = FeatureExtractWrapper(self._make(), out_indices=out_indices, model_name=self.model_name, **kwargs)
        wrapper.full_state_keys = self.full_state_keys
        return wrapper


def _entries(names: Sequence[str], maps: Sequence[_Map], method: str) -> List[Dict[str, Any]]:
    seen: Dict[str, int] = {}
    info = []
    for name, m in zip(names, maps):
        seen[name] = seen.get(name, 0) + 1
        entry = dict(chs=m.chs, reduction=m.reduction, name=name if seen[name] == 1 else f"{name}#{seen[name]}",
                     method=method, layout=m.layout)
        if m.layout == "tokens":
            entry["prefix_tokens"] = m.prefix
        info.append(entry)
    return info


def _cfg(model_name: str, input_size: Tuple[int, int, int], fixed: bool, first_conv: str) -> ModelCfg:
    extra = dict(fixed_input_size=True, min_input_size=input_size,
                 size_note=f"discovery: the model did not run at a second probe size, only at "
                           f"{input_size[1]}x{input_size[2]}") if fixed else {}
    return ModelCfg(name=model_name, input_size=input_size, first_conv=first_conv, classifier="", **extra)


def _first_conv(model: nn.Module) -> str:
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return path
    return ""


def _discover_graph(model: nn.Module, gm: fx.GraphModule, returned_by: Mapping[fx.Node, str], method: str,
                    input_size: Tuple[int, int, int], model_name: str) -> Optional[Discovery]:
    c, h, w = input_size
    device = _model_device(model)
    x_a = torch.randn(1, c, h, w, device=device)
    values_a = _propagate(gm, x_a)
    size_b = _second_size((h, w))
    try:
        values_b: Optional[Dict[fx.Node, Any]] = _propagate(gm, torch.randn(1, c, *size_b, device=device))
    except Exception as e:  # noqa: BLE001 - the model accepts one size only (a ViT): one probe
        _logger.info("%s: no second probe at %dx%d (%s); reading shapes at %dx%d only", model_name, *size_b,
                     str(e).splitlines()[0] if str(e) else type(e).__name__, h, w)
        values_b = None
    graph = gm.graph
    carries = {n for n, v in values_a.items() if _has_tensor(v)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    entry = placeholders[0]
    sink = next(iter(graph.find_nodes(op="output")))
    preds = _graph_preds(graph, carries)
    chain, reached = _dominators(list(graph.nodes), preds, entry, sink)
    cache: Dict[fx.Node, Optional[_Map]] = {}

    def map_of(n: fx.Node) -> Optional[_Map]:
        if n not in cache:
            cache[n] = _as_map(values_a.get(n), (h, w), values_b.get(n) if values_b else None,
                               size_b if values_b else None)
        return cache[n]

    scopes = {n: [p for p, _ in (n.meta.get("nn_module_stack") or {}).values() if p] for n in graph.nodes}
    levels = _select(chain, reached, map_of, scopes, preds)
    if not levels:
        return None
    maps = {n: map_of(n) for n in levels}
    names = [returned_by.get(n, n.name) for n in levels]
    info = _entries(names, [maps[n] for n in levels], method)
    cfg = _cfg(model_name, input_size, values_b is None, _first_conv(model))
    non_persistent = _non_persistent_buffers(model)
    level_maps = [maps[n] for n in levels]
    return Discovery(model_name, method, info, cfg, frozenset(model.state_dict()),
                     lambda: _GraphLevels(gm, levels, level_maps, [dict(e) for e in info], cfg, non_persistent))


def _discover_hooks(model: nn.Module, input_size: Tuple[int, int, int], model_name: str) -> Optional[Discovery]:
    c, h, w = input_size
    rec, sink, returned_by, first_call = _run_hooks_probe(model, (h, w), c)
    order = list(range(len(rec.preds)))
    preds = {i: p for i, p in enumerate(rec.preds)}
    chain, reached = _dominators(order, preds, 0, sink)
    cache: Dict[int, Optional[_Map]] = {}

    def map_of(i: int) -> Optional[_Map]:
        if i not in cache:  # a hook can capture only what a module returns
            cache[i] = _as_map(rec.values[i], (h, w)) if i in returned_by else None
        return cache[i]

    scopes = {i: rec.scopes[i] for i in order if i < len(rec.scopes)}
    levels = _select(chain, reached, map_of, scopes, preds)
    if not levels:
        return None
    maps = {i: map_of(i) for i in levels}
    taps = [returned_by[i] for i in levels]
    info = _entries([p for p, _ in taps], [maps[i] for i in levels], "hooks")
    cfg = _cfg(model_name, input_size, True, _first_conv(model))
    level_maps = [maps[i] for i in levels]
    keys = frozenset(model.state_dict())
    return Discovery(model_name, "hooks", info, cfg, keys,
                     lambda: _HookLevels(model, taps, level_maps, first_call, levels, [dict(e) for e in info], cfg))


def discover(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), *,
             method: Union[str, Sequence[str], None] = None, model_name: Optional[str] = None) -> Discovery:
    """Find ``model``'s feature levels (see the module docstring for the rule).

    Args:
        model: any ``nn.Module`` taking an image batch ``(B, C, H, W)`` as its first argument.
        input_size: ``(C, H, W)`` of the probe; a size the model accepts.
        method: ``"fx"``, ``"export"`` or ``"hooks"`` to use only that one, or several to try in the
            order given; ``None`` tries all three in that order. (Export with free sizes can take
            minutes on a model with much shape arithmetic; ``("fx", "hooks")`` skips it.)
        model_name: the name in messages and ``feature_info``; default the model's class name.

    Raises ``ValueError`` when the arguments are wrong or no method finds a level.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"discovery needs an nn.Module, got {type(model).__name__} {model!r:.80}")
    input_size = _check_input_size(tuple(input_size) if isinstance(input_size, list) else input_size)
    methods = list(METHODS) if method is None else [method] if isinstance(method, str) else list(method)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"method={method!r} is not valid; use one of {list(METHODS)}, several of them, or None "
                         f"(try them in order)")
    name = model_name or type(model).__name__
    if any(p.requires_grad for p in model.parameters()) and model.training:
        _logger.info("%s: discovering in training mode; call model.eval() first for inference features", name)
    failures: Dict[str, str] = {}
    for m in methods:
        try:
            if m == "fx":
                gm, returned_by = _trace_fx(model)
                found = _discover_graph(model, gm, returned_by, "fx", input_size, name)
            elif m == "export":
                x = torch.randn(1, *input_size, device=_model_device(model))
                gm, returned_by = _trace_export(model, x)
                found = _discover_graph(model, gm, returned_by, "export", input_size, name)
            else:
                found = _discover_hooks(model, input_size, name)
        except Exception as e:  # noqa: BLE001 - a method that fails hands over to the next
            failures[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _logger.info("%s: %s discovery failed: %s", name, m, failures[m])
            continue
        if found is None:
            failures[m] = "no feature map lies on every path from the input to the output"
            continue
        found.failures = failures
        if failures:
            _logger.info("%s: levels found by %s (%s)", name, m, "; ".join(f"{k}: {v}" for k, v in failures.items()))
        return found
    raise ValueError(f"{name}: no feature levels found at input {input_size}: "
                     + "; ".join(f"{k}: {v}" for k, v in failures.items())
                     + ". The model must take an image batch (B, C, H, W) as its first argument and compute "
                       "feature maps (NCHW, NHWC or tokens) that every path to its output passes through")


def wrap(model: nn.Module, out_indices: Union[Sequence[int], str, None] = "pyramid",
         input_size: Sequence[int] = (3, 224, 224), *, method: Union[str, Sequence[str], None] = None,
         model_name: Optional[str] = None, as_dict: bool = False,
         level_names: Union[str, Sequence[str], None] = None, frozen_stages: int = -1,
         norm_eval: bool = False) -> FeatureExtractWrapper:
    """Any image model as a featurezoo backbone: its levels found by :func:`discover`.

    >>> import torchvision
    >>> backbone = wrap(torchvision.models.resnet18().eval())
    >>> backbone.out_channels, backbone.feature_info.reduction()
    ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32])

    ``out_indices``, ``as_dict``, ``level_names``, ``frozen_stages`` and ``norm_eval``
    mean what they mean for ``create_model(..., features_only=True)``. The backbone
    shares the model's modules (a traced model is left as it is; with the hooks
    method the modules past the deepest level are removed from it).
    """
    found = discover(model, input_size, method=method, model_name=model_name)
    return found.backbone(out_indices, as_dict=as_dict, level_names=level_names, frozen_stages=frozen_stages,
                          norm_eval=norm_eval)


# -- factories named by import path ------------------------------------------------------------
def is_factory_path(spec: Any) -> bool:
    """Whether ``spec`` is an import path to a model factory, ``"pkg.module:fn"``."""
    return isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable ``"pkg.module:fn"`` names (``"torchvision.models:resnet50"``); ``ValueError`` if it
    does not import or is not callable. Dotted attributes after the colon are followed (``mod:Class.build``)."""
    if not is_factory_path(spec):
        raise ValueError(f"{spec!r} is not an import path to a model factory; write it as 'package.module:function', "
                         f"e.g. 'torchvision.models:resnet50'")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec}: {attr!r} is a {type(obj).__name__}, not a callable that returns a model")
    return obj
