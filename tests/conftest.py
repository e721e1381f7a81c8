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


def pytest_collection_modifyitems(config, items):
    """Tests of the largest models run on one xdist worker, one at a time (memory)."""
    from tests.zoo import HUGE_MODELS

    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("name") in HUGE_MODELS:
            item.add_marker(pytest.mark.xdist_group("huge"))
