"""Building blocks shared by model families."""
from .padding import AvgPool2d, Conv2d, MaxPool2d, same_pad
from .pooling import GlobalAvgPooling

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "same_pad", "GlobalAvgPooling"]
