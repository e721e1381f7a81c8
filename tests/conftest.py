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


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which would miss the marks added here
def pytest_collection_modifyitems(config, items):
    """Tests of the largest models run on one xdist worker, one at a time (memory); so do the tests of
    each other ``xdist_group`` (``--dist loadgroup``, as ``make test`` runs)."""
    from tests.zoo import HUGE_MODELS

    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("name") in HUGE_MODELS:
            item.add_marker(pytest.mark.xdist_group("huge"))
    if getattr(config.option, "loadgroup", False):  # set on xdist workers
        _name_groups(items)


def _name_groups(items):
    """Give each grouped test the ``nodeid@group`` name xdist's scheduler sends to one worker.

    pytest-xdist 3.8 renames ``item._nodeid``, which pytest 9 no longer reads
    (the id lives in ``item._id``): every group was silently spread over the
    workers. This names the tests on the id pytest 9 reads, unless xdist
    already did.
    """
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
