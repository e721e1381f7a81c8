"""Weight initialisation schemes of MindCV's families, named and applied once.

A family's ``__init__`` ends with one call, e.g.
``init_weights(self, conv=fan_out_normal, linear=lecun_uniform)`` (ResNet),
naming the initialiser of each layer type. :func:`init_weights` visits
``model.modules()`` once, in order, drawing each weight and then its bias, as
MindCV's per-family loops do: a seed gives the weights those loops gave (to float rounding).

BatchNorm layers are left alone: PyTorch builds them with weight 1 and bias 0,
which is what MindCV's loops set.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["init_weights", "Init", "fan_out_normal", "fan_in_normal", "he_uniform", "lecun_uniform",
           "lecun_uniform_fan_out", "torch_uniform", "inv_sqrt_out_uniform", "inv_in_normal", "xavier_uniform",
           "normal", "trunc_normal"]

# An initialiser fills one weight (or bias) tensor in place.
Init = Callable[[torch.Tensor], Any]


def init_weights(model: nn.Module, conv: Optional[Init] = None, linear: Optional[Init] = None,
                 bias: Init = nn.init.zeros_, special: Optional[Mapping[nn.Module, Init]] = None) -> None:
    """Initialise every ``nn.Conv2d`` weight with ``conv`` and every ``nn.Linear`` weight with ``linear``
    (``None``: keep PyTorch's), each followed by its bias, if any, with ``bias``.

    ``special`` gives single modules their own weight initialiser (SqueezeNet's
    final conv, ShuffleNet's first conv).
    """
    special = special or {}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init = special.get(m, conv)
        elif isinstance(m, nn.Linear):
            init = special.get(m, linear)
        else:
            continue
        if init is None:
            continue
        init(m.weight)
        if m.bias is not None:
            bias(m.bias)


def fan_out_normal(w: torch.Tensor) -> torch.Tensor:
    """N(0, sqrt(2 / fan_out)): MindSpore's ``HeNormal(mode="fan_out")``, PyTorch's
    ``kaiming_normal_(mode="fan_out")``; the conv init of most of MindCV's CNNs."""
    return nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")


def fan_in_normal(w: torch.Tensor) -> torch.Tensor:
    """N(0, sqrt(2 / fan_in)): MindSpore's ``HeNormal()`` (GoogLeNet's convs)."""
    return nn.init.kaiming_normal_(w, a=0, mode="fan_in", nonlinearity="leaky_relu")


def he_uniform(w: torch.Tensor) -> torch.Tensor:
    """U(+-sqrt(6 / fan_in)): MindSpore's ``HeUniform`` with a ReLU gain."""
    return nn.init.kaiming_uniform_(w, nonlinearity="relu")


def lecun_uniform(w: torch.Tensor) -> torch.Tensor:
    """U(+-sqrt(3 / fan_in)) (MindCV's ``HeUniform(mode="fan_in", nonlinearity="sigmoid")``)."""
    return nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="sigmoid")


def lecun_uniform_fan_out(w: torch.Tensor) -> torch.Tensor:
    """U(+-sqrt(3 / fan_out)) (MNASNet's classifier)."""
    return nn.init.kaiming_uniform_(w, mode="fan_out", nonlinearity="sigmoid")


def torch_uniform(w: torch.Tensor) -> torch.Tensor:
    """U(+-1 / sqrt(fan_in)): PyTorch's and MindSpore's default ``Linear``/``Dense`` weight
    (``HeUniform(sqrt(5))``), drawn again in module order."""
    return nn.init.kaiming_uniform_(w, a=5 ** 0.5)


def inv_sqrt_out_uniform(w: torch.Tensor) -> torch.Tensor:
    """U(+-1 / sqrt(w.shape[0])): bounded by the number of *outputs* (EfficientNet's and MixNet's
    classifier; ReXNet's biases, which MindSpore draws as a (1, C) tensor)."""
    bound = 1.0 / math.sqrt(w.shape[0])
    return nn.init.uniform_(w, -bound, bound)


def inv_in_normal(w: torch.Tensor) -> torch.Tensor:
    """N(0, 1 / in_channels per group) (ShuffleNet's convs)."""
    return nn.init.normal_(w, 0.0, 1.0 / w.shape[1])


def xavier_uniform(w: torch.Tensor) -> torch.Tensor:
    return nn.init.xavier_uniform_(w)


def normal(std: float) -> Init:
    """N(0, std)."""
    return partial(nn.init.normal_, mean=0.0, std=std)


def trunc_normal(std: float, a: float, b: float) -> Init:
    """N(0, std) truncated to [a, b]."""
    return partial(nn.init.trunc_normal_, std=std, a=a, b=b)
