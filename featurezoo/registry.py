"""Model registry: names, their builder functions and their declared cfgs.

``@register_model`` keys on ``fn.__name__`` (as MindCV, timm and torchvision do)
and refuses a second function with the same name, so a typo or a copied
builder can never silently replace a model. A family module that declares
``default_cfgs`` before its builders has each builder's cfg filed with it (as
timm's registry does); a builder missing from a module's ``default_cfgs`` is an
error at import. Every question about a model that its cfg answers (weights
URL, input size, timm twin, ...) is answered here without building it.

Layer: imports only :mod:`featurezoo.cfg` and :mod:`featurezoo.validate`. Calling a builder (``call_builder``,
``build_on_meta``) runs code of the layers above, which this module never imports.
"""
from __future__ import annotations

import contextvars
import difflib
import fnmatch
import functools
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .cfg import ModelCfg, resolve_cfg
from .validate import check_builder_args, check_keywords

__all__ = ["register_model", "list_models", "is_model", "model_entrypoint", "list_modules", "model_module",
           "get_model_cfg", "call_builder", "build_on_meta", "current_model_name", "supports_features",
           "models_with_output_stride"]

_model_entrypoints: Dict[str, Callable] = {}
_model_to_module: Dict[str, str] = {}
_model_cfgs: Dict[str, ModelCfg] = {}

# The registered name whose builder is running, for cfgs (MindCV-style dicts) that carry none.
_building = contextvars.ContextVar("featurezoo_building_model", default="")


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` as the builder of the model named ``fn.__name__``.

    If ``fn``'s module declares ``default_cfgs`` (a mapping of model name to
    cfg), the entry for this name is filed with it; a module that declares
    ``default_cfgs`` without an entry for one of its builders is an error.
    """
    name = fn.__name__
    if name in _model_entrypoints:
        prev = _model_entrypoints[name]
        raise ValueError(
            f"register_model: a model named {name!r} is already registered "
            f"(by {prev.__module__}.{prev.__qualname__}); model names must be unique"
        )
    declared = getattr(fn, "__globals__", {}).get("default_cfgs")
    if isinstance(declared, Mapping):
        if name not in declared:
            raise ValueError(
                f"register_model: {fn.__module__} declares default_cfgs but has no entry for {name!r}; "
                f"its entries: {sorted(declared)}"
            )
        cfg = resolve_cfg(declared[name], name=name)
    else:
        cfg = ModelCfg(name=name)
    _model_entrypoints[name] = fn
    _model_to_module[name] = fn.__module__.split(".")[-1]
    _model_cfgs[name] = cfg
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
        names = [n for n in names if supports_features(n)]
    return sorted(names, key=_natural_key)


def list_modules() -> List[str]:
    """Family modules that registered at least one model."""
    return sorted(set(_model_to_module.values()))


def model_module(model_name: str) -> str:
    """The family module a model was registered from (``"resnet"``)."""
    return _model_to_module[_check_name(model_name)]


def is_model(model_name: Any) -> bool:
    return isinstance(model_name, str) and model_name in _model_entrypoints


def _check_name(model_name: Any) -> str:
    if not isinstance(model_name, str):
        raise ValueError(f"a model name must be a str, got {type(model_name).__name__} {model_name!r}; "
                         f"see featurezoo.list_models()")
    if model_name not in _model_entrypoints:
        close = difflib.get_close_matches(model_name, list(_model_entrypoints), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see featurezoo.list_models()"
        raise ValueError(f"Unknown model {model_name!r}{hint}")
    return model_name


def model_entrypoint(model_name: str) -> Callable:
    """The builder function registered under ``model_name``."""
    return _model_entrypoints[_check_name(model_name)]


def get_model_cfg(model_name: str) -> ModelCfg:
    """The cfg declared with ``model_name``'s builder (a default cfg if its module declares none)."""
    return _model_cfgs[_check_name(model_name)]


def current_model_name() -> str:
    """The registered name whose builder is running (``""`` outside :func:`call_builder`)."""
    return _building.get()


def call_builder(model_name: str, **kwargs: Any) -> nn.Module:
    """Run ``model_name``'s builder with ``kwargs``, telling the builder which name it builds.

    Arguments are checked first (:func:`featurezoo.validate.check_builder_args`); a keyword the
    builder fixes itself (``layers=`` for ``resnet50``) is a ``ValueError``, not a ``TypeError``."""
    fn = model_entrypoint(model_name)
    check_builder_args(model_name, kwargs)
    check_keywords(model_name, fn, kwargs)
    token = _building.set(model_name)
    try:
        return fn(**kwargs)
    except TypeError as err:
        fixed = _fixed_keyword(err, kwargs)
        if fixed is None:
            raise
        raise ValueError(f"{model_name}: {fixed}={kwargs[fixed]!r} cannot be given; its builder sets {fixed} "
                         f"itself (it defines the variant). Pick another model instead: see "
                         f"featurezoo.list_models(module={_model_to_module[model_name]!r})") from None
    finally:
        _building.reset(token)


def _fixed_keyword(err: TypeError, kwargs: Mapping[str, Any]) -> Optional[str]:
    """The caller's keyword that a builder also passes itself ("got multiple values for keyword argument")."""
    match = re.search(r"got multiple values for (?:keyword )?argument '(\w+)'", str(err))
    return match.group(1) if match and match.group(1) in kwargs else None


def build_on_meta(model_name: str, **kwargs: Any) -> nn.Module:
    """Build ``model_name`` on the meta device: module tree, shapes and feature metadata,
    no weights allocated (cheap even for the largest variants). The one helper for that."""
    with torch.device("meta"):
        return call_builder(model_name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=None)
def supports_features(model_name: str) -> bool:
    """Whether ``create_model(model_name, features_only=True)`` works (it registers ``feature_info``)."""
    return bool(getattr(build_on_meta(model_name), "feature_info", None))


def models_with_output_stride() -> List[str]:
    """The registered models whose cfg declares ``output_strides`` (dilated last stages)."""
    return sorted(n for n, c in _model_cfgs.items() if c.output_strides)
