"""Functions that ``torch.fx`` records as one call instead of tracing into them.

FX traces a forward with symbolic values: ``x.shape[-2:]`` is a ``Proxy``, and a
Python ``if`` or ``int()`` on it raises. A few helpers must branch on the input
size (a position embedding resampled only when the grid differs from the native
one, a size refused with a ``ValueError``, a map cropped to the image). Marked
with :func:`fx_call`, they appear in a traced graph as a single
``call_function`` node that runs them eagerly with the real sizes, so the graph
stays correct at every size (see :mod:`featurezoo.fx`). Each takes tensors and
constants and returns a tensor, so the node lies on the data path and is never
removed as dead code. Its name must not start with ``_``: FX patches public
module-level names only.

Layer: the model layer's building blocks (imports nothing from featurezoo).
"""
from __future__ import annotations

from typing import Callable, List, TypeVar

__all__ = ["fx_call", "FX_CALLS"]

F = TypeVar("F", bound=Callable)

#: Every function marked with :func:`fx_call`, in the order they were defined.
FX_CALLS: List[Callable] = []


def fx_call(fn: F) -> F:
    """Mark ``fn`` (a public module-level function) to be recorded by ``featurezoo.fx`` as one call."""
    if fn.__name__.startswith("_"):
        raise ValueError(f"fx_call: {fn.__qualname__} starts with '_'; torch.fx records public names only")
    FX_CALLS.append(fn)
    return fn
