"""Optional third-party packages: imported where used, with a one-line error naming the extra.

The core needs torch, numpy and safetensors. The command line and the
extraction library also use Pillow (decoding), matplotlib (``plot``,
``demo``) and tqdm (progress bars), declared as the ``cli`` extra::

    pip install 'featurezoo[cli]'

Layer: the bottom one; this module imports nothing from featurezoo.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ["MissingDependency", "require", "PACKAGES"]

# import name -> the name pip installs it under
PACKAGES = {"PIL": "Pillow", "matplotlib": "matplotlib", "tqdm": "tqdm", "torchvision": "torchvision",
            "onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}


class MissingDependency(ModuleNotFoundError):
    """An optional package is not installed; ``str()`` is one line that says what to install."""

    def __init__(self, module: str, extra: str, feature: str, package: Optional[str] = None):
        top = module.split(".")[0]
        self.package = package or PACKAGES.get(top, top)
        self.extra = extra
        self.feature = feature
        super().__init__(f"{feature} needs {self.package}: pip install 'featurezoo[{extra}]'", name=top)


def require(module: str, extra: str, feature: str, package: Optional[str] = None) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingDependency`.

    ``feature`` says what needs it (``"featurezoo extract"``); ``extra`` is the
    extra that installs it (``"cli"``). Only the absence of ``module`` (or of a
    package it lives in) is translated; an installed package that fails to
    import raises its own error.

    >>> require("json", "cli", "a doctest").__name__
    'json'
    """
    parts = module.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    try:
        for name in prefixes:  # the package first: a blocked or missing package hides its cached submodules
            mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in prefixes:
            raise
        raise MissingDependency(module, extra, feature, package) from None
    return mod
