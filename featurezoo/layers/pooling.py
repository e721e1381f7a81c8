"""Global pooling as MindCV's ``GlobalAvgPooling`` (mean over H and W)."""
import torch
import torch.nn as nn

__all__ = ["GlobalAvgPooling"]


class GlobalAvgPooling(nn.Module):
    def __init__(self, keep_dims: bool = False):
        super().__init__()
        self.keep_dims = keep_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keep_dims)
