"""``torch.fx`` for every feature model.

``torch.fx.symbolic_trace`` works on most CNN families as they are (MindSpore's
size-dependent ``same`` padding is an FX-wrapped function, see
:mod:`featurezoo.layers.padding`). Models with Python control flow over the
input's size (position embeddings resampled to the token grid, windows padded
to a multiple of the window, a token count checked) cannot be traced by FX's
default tracer: a traced size is a ``Proxy`` and ``if`` on it raises
``TraceError``. :func:`symbolic_trace` traces them anyway, the way
torchvision's ``create_feature_extractor`` lets a user name leaf modules: a
submodule whose forward cannot be traced becomes a leaf (one ``call_module``
node, run eagerly, its parameters under its own name) and the rest of the
model is traced op by op. The leaves chosen are recorded on the result
(``graph_module.meta["fx_leaves"]``: module path -> why), so what was not
traced is never hidden.

Helpers that branch on a size in Python (``resample_pos_embed``,
``tokens_to_nchw``, the families' size checks: every function marked with
:func:`featurezoo.layers.fx_calls.fx_call`) are recorded as single calls (FX's
``autowrap_functions``), which run eagerly with the real sizes.

Layer: the model layer (imports :mod:`featurezoo.layers`).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn

from .layers.fx_calls import FX_CALLS

__all__ = ["symbolic_trace", "LeafFallbackTracer"]

_TRACE_ERRORS = (torch.fx.proxy.TraceError, TypeError, RuntimeError, ValueError, AttributeError,
                 NotImplementedError, IndexError, AssertionError)


class LeafFallbackTracer(torch.fx.Tracer):
    """FX's tracer, except that a submodule whose forward cannot be traced is kept as a leaf."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("autowrap_functions", tuple(FX_CALLS))
        super().__init__(**kwargs)
        self.leaves: Dict[str, str] = {}

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> torch.fx.Graph:
        # Record the marked helpers as calls wherever featurezoo's code calls them (FX patches only the
        # globals of the root's forward by default): the models, and layers such as plain_pyramid.
        ours = [m for n, m in sorted(sys.modules.items()) if n == "featurezoo" or n.startswith("featurezoo.")]
        self._autowrap_search = list(self._autowrap_search) + [m for m in ours if m is not None]
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...],
                    kwargs: Dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        stack = list(self.module_stack.keys())
        scope = (self.scope.module_path, self.scope.module_type)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _TRACE_ERRORS as e:
            # Undo the failed descent (the nodes it made are dead and removed after tracing).
            while len(self.module_stack) > len(stack):
                self.module_stack.popitem(last=True)
            self.scope.module_path, self.scope.module_type = scope
            self.leaves[path] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            return super().call_module(m, forward, args, kwargs)


def symbolic_trace(model: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with untraceable submodules kept as leaves (see the module
    docstring); the result computes what ``model`` computes and holds its parameter names."""
    tracer = LeafFallbackTracer()
    graph = tracer.trace(model, concrete_args)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.meta["fx_leaves"] = dict(tracer.leaves)
    return gm
