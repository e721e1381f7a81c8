"""Model registry: every builder function is registered under its own name.

``@register_model`` keys on ``fn.__name__`` (as MindCV, timm and torchvision do)
and refuses a second function with the same name, so a typo or a copied
builder can never silently replace a model.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

__all__ = ["register_model", "list_models", "is_model", "model_entrypoint", "list_modules", "model_module"]

_model_entrypoints: Dict[str, Callable] = {}
_model_to_module: Dict[str, str] = {}


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` as the builder of the model named ``fn.__name__``."""
    name = fn.__name__
    if name in _model_entrypoints:
        prev = _model_entrypoints[name]
        raise ValueError(
            f"register_model: a model named {name!r} is already registered "
            f"(by {prev.__module__}.{prev.__qualname__}); model names must be unique"
        )
    _model_entrypoints[name] = fn
    _model_to_module[name] = fn.__module__.split(".")[-1]
    return fn


def _natural_key(name: str) -> List[Union[int, str]]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def list_models(
    pattern: Union[str, Sequence[str], None] = None,
    features_only: bool = False,
    module: Optional[str] = None,
    exclude: Union[str, Sequence[str], None] = None,
) -> List[str]:
    """Names of registered models, naturally sorted.

    Args:
        pattern: shell-style wildcard(s) (``"resnet*"``); ``None`` lists all.
        features_only: keep only models that support ``features_only=True``
            (read from a weightless meta-device build, cached).
        module: keep only models defined in this family module (``"resnet"``).
        exclude: wildcard(s) of names to drop.
    """
    names: Iterable[str] = _model_entrypoints.keys()
    if pattern:
        pats = [pattern] if isinstance(pattern, str) else list(pattern)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if exclude:
        excl = [exclude] if isinstance(exclude, str) else list(exclude)
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excl)]
    if module is not None:
        names = [n for n in names if _model_to_module[n] == module]
    if features_only:
        from .features import supports_features  # local: features imports the builder stack

        names = [n for n in names if supports_features(n)]
    return sorted(names, key=_natural_key)


def list_modules() -> List[str]:
    """Family modules that registered at least one model."""
    return sorted(set(_model_to_module.values()))


def model_module(model_name: str) -> str:
    """The family module a model was registered from (``"resnet"``)."""
    return _model_to_module[_check_name(model_name)]


def is_model(model_name: str) -> bool:
    return model_name in _model_entrypoints


def _check_name(model_name: str) -> str:
    if model_name not in _model_entrypoints:
        close = difflib.get_close_matches(model_name, list(_model_entrypoints), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see featurezoo.list_models()"
        raise ValueError(f"Unknown model {model_name!r}{hint}")
    return model_name


def model_entrypoint(model_name: str) -> Callable:
    """The builder function registered under ``model_name``."""
    return _model_entrypoints[_check_name(model_name)]
