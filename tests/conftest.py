import os
import sys

import pytest
import torch

# Keep per-test CPU use predictable under pytest-xdist (2 workers on 2 cores).
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
