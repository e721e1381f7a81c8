"""Caches of constant tensors (relative position indices, shift masks) that graph capture cannot poison.

``torch.export`` and ``torch.compile`` run the model's Python with fake
tensors: a constant built there (``torch.arange`` under the fake mode) is a
fake tensor, and a cache that kept it would hand it to every later eager call
(wrong values, or tensors that cannot be read). :func:`tensor_cache` and
:func:`cacheable` keep only real tensors built outside a compiler's trace.

Layer: part of :mod:`featurezoo.layers`; imports torch only.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable, Optional, TypeVar

import torch

__all__ = ["cacheable", "tensor_cache"]

F = TypeVar("F", bound=Callable[..., Any])


def cacheable(value: Any) -> bool:
    """Whether ``value`` (a tensor or a tuple/list of them) may be kept across calls: plain
    ``torch.Tensor`` objects only (no fake or functional subclass), built outside a compiler's trace."""
    if isinstance(value, (tuple, list)):
        return all(cacheable(v) for v in value)
    return type(value) is torch.Tensor and not torch.compiler.is_compiling()


def tensor_cache(maxsize: Optional[int] = None) -> Callable[[F], F]:
    """``functools.lru_cache`` for functions of hashable arguments that return constant tensors,
    storing a result only when :func:`cacheable` says so."""
    def decorate(fn: F) -> F:
        store: "OrderedDict[Any, Any]" = OrderedDict()

        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            if args in store:
                store.move_to_end(args)
                return store[args]
            value = fn(*args)
            if cacheable(value):
                store[args] = value
                if maxsize is not None and len(store) > maxsize:
                    store.popitem(last=False)
            return value

        wrapper.cache_clear = store.clear  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]
    return decorate
