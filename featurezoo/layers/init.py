"""Weight initialisation that several MindCV families share."""
from __future__ import annotations

import math

import torch.nn as nn

__all__ = ["init_fan_out_normal"]


def init_fan_out_normal(model: nn.Module) -> None:
    """MindCV's MobileNet/RegNet/NASNet scheme: convs normal with std sqrt(2 / fan_out),
    BatchNorm ones/zeros, Linear normal(0, 0.01), biases zero."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
