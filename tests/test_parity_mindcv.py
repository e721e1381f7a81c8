"""MindCV parity: our model loads MindCV's own .ckpt (randomised BN statistics
and affine parameters) and must give MindCV's logits and features."""
import numpy as np
import pytest
import torch

import featurezoo as fz
from tests.reference import load_meta, load_reference
from tests.zoo import PARITY_EXCEPTIONS, PARITY_RTOL_OVERRIDES, ref_args, skip_init, zoo_models

RTOL = 1e-4


def assert_rel_close(ours: torch.Tensor, ref: np.ndarray, what: str, rtol: float = RTOL):
    ref_t = torch.from_numpy(ref)
    assert tuple(ours.shape) == tuple(ref_t.shape), f"{what}: shape {tuple(ours.shape)} vs MindCV {ref.shape}"
    scale = ref_t.abs().max().item()
    err = (ours - ref_t).abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"{what}: max abs error {err:.3g} > {rtol} x max|ref| {scale:.3g}"


@pytest.mark.parametrize("name", zoo_models())
def test_logits_and_features_match_mindcv(name):
    if name in PARITY_EXCEPTIONS:
        error = load_meta(name, **ref_args(name)).get("error")
        assert error, f"{name} is listed as one MindCV cannot run, but its reference ran: remove the exception"
        return
    ref = load_reference(name, **ref_args(name))
    x = torch.from_numpy(ref.input)
    with skip_init():  # the checkpoint fills every tensor
        model = fz.create_model(name, checkpoint_path=str(ref.ckpt)).eval()
    rtol = PARITY_RTOL_OVERRIDES.get(name, RTOL)
    with torch.no_grad():
        assert_rel_close(model(x), ref.logits, f"{name} logits", rtol)
    ours = [{k: e[k] for k in ("chs", "reduction", "name")} for e in model.feature_info]
    del model  # the largest models must not be held twice
    if ref.feature_info is None:
        return
    assert ours == [{k: e[k] for k in ("chs", "reduction", "name")} for e in ref.feature_info]
    assert ref.features is not None, ref.features_error
    with skip_init():
        feat = fz.create_model(name, features_only=True, checkpoint_path=str(ref.ckpt)).eval()
    with torch.no_grad():
        outs = feat(x)
    for i, (out, expected) in enumerate(zip(outs, ref.features)):
        assert_rel_close(out, expected, f"{name} feature {i} ({ours[i]['name']})", rtol)
