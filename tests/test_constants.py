"""Constant-tensor caches survive graph capture (layers/constants.py): torch.export runs the model
with fake tensors, and a cache that kept a constant built there broke every later eager call."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import featurezoo as fz
from featurezoo.layers.constants import cacheable, tensor_cache


def test_only_real_tensors_are_cached():
    calls = []

    @tensor_cache(maxsize=2)
    def arange(n):
        calls.append(n)
        return torch.arange(n)

    assert cacheable(torch.zeros(1)) and cacheable((torch.zeros(1), torch.ones(1)))
    with FakeTensorMode():
        fake = arange(3)
        assert not cacheable(fake) and not cacheable((torch.zeros(1), fake))
    real = arange(3)
    assert type(real) is torch.Tensor and torch.equal(real, torch.arange(3))
    assert arange(3) is real and calls == [3, 3]  # the fake result was not kept, the real one is
    arange(4), arange(5)
    arange(3)
    assert calls == [3, 3, 4, 5, 3]  # maxsize=2 evicted the oldest


@pytest.mark.parametrize("name, size", [("swin_tiny", (72, 104)), ("swinv2_tiny_window8", (72, 104)),
                                        ("convit_tiny", (80, 112))])
def test_torch_export_leaves_the_eager_model_intact(name, size):
    model = fz.create_model(name, features_only=True, out_indices=[0, 1]).eval()
    x = torch.randn(2, 3, *size)
    # A size no other test uses, so the export is the first to build (and would cache) its constants.
    torch.export.export(model, (x,))
    with torch.no_grad():
        after = model(x)
        fresh = fz.create_model(name, features_only=True, out_indices=[0, 1]).eval()
        fresh.load_state_dict(model.state_dict())
        want = fresh(x)
    for got, ref in zip(after, want):
        assert type(got) is torch.Tensor
        assert torch.equal(got, ref)
