"""The reference cache keeps large nets as recipes: rebuilding their checkpoints must give MindSpore's bytes.

``tools/mindcv_reference.py`` (numpy 1.x, MindSpore) synthesises every large parameter from a recipe before the
forward pass and keeps ``model.ckpt`` only under 50 MB; ``tests/reference.py`` (numpy 2.x) rebuilds the others.
Where MindSpore's checkpoint was kept, the rebuild is checked against it byte for byte.
"""
import numpy as np
import pytest
import torch

from featurezoo.checkpoint.mindspore_ckpt import read_mindspore_ckpt, write_mindspore_ckpt
from tests import reference
from tests.reference import load_reference, rebuilt_checkpoint, rebuilt_state
from tests.zoo import ref_args
from tools.synth_weights import KEEP_CKPT_BYTES, MIN_NUMEL, needs_recipe, recipe_of, synthesise

# Kept checkpoints with synthesised parameters: CNNs and transformers with class tokens and position embeddings.
KEPT = ["resnet18", "pit_ti", "xcit_tiny_12_p16_224"]
# References whose checkpoints are rebuilt (over 50 MB); PVT's float16 position embeddings stay exact.
REBUILT = ["resnet50", "pvt_tiny"]


@pytest.mark.parametrize("name", KEPT)
def test_rebuilt_checkpoint_is_mindspores_byte_for_byte(name, tmp_path):
    ref = load_reference(name, **ref_args(name))
    kept = ref.dir / "model.ckpt"
    assert kept.is_file() and ref.ckpt == kept
    recipes = [w for w in ref.meta["weights"] if w[3] is not None]
    assert recipes, f"{name}: no parameter was synthesised, so this checks nothing of the recipes"
    state = rebuilt_state(ref.dir, ref.meta)
    written = read_mindspore_ckpt(kept)
    assert list(state) == list(written)
    for key, value in written.items():
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(state[key])), value), key
    write_mindspore_ckpt(state, tmp_path / "rebuilt.ckpt")
    assert (tmp_path / "rebuilt.ckpt").read_bytes() == kept.read_bytes()


def test_pvt_float16_parameters_are_stored_exactly():
    ref = load_reference("pvt_tiny", **ref_args("pvt_tiny"))
    half = [w[0] for w in ref.meta["weights"] if w[1] == "float16"]
    assert half == [f"pos_embed{i}" for i in range(1, 5)]
    assert all(w[3] is None for w in ref.meta["weights"] if w[0] in half)
    state = read_mindspore_ckpt(ref.ckpt)
    with np.load(ref.dir / "weights.npz") as small:
        for key in half:
            assert state[key].dtype == torch.float16 and state[key].std() > 0.1  # randomised, not zeros
            assert torch.equal(state[key], torch.from_numpy(small[key]))


@pytest.mark.parametrize("name", REBUILT)
def test_large_references_keep_no_checkpoint_and_rebuild_one(name):
    ref = load_reference(name, **ref_args(name))
    nbytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, dtype, shape, _ in ref.meta["weights"])
    assert nbytes >= KEEP_CKPT_BYTES and not (ref.dir / "model.ckpt").exists()
    path = ref.ckpt
    assert path.parent != ref.dir and path.stat().st_size > nbytes
    state = read_mindspore_ckpt(path)
    assert list(state) == [w[0] for w in ref.meta["weights"]] == list(ref.param_shapes)
    assert [list(v.shape) for v in state.values()] == list(ref.param_shapes.values())
    for name_, dtype, shape, recipe in ref.meta["weights"]:
        if recipe is not None:
            value = state[name_].double()
            assert recipe["lo"] <= value.min().item() and value.max().item() <= recipe["hi"]


def test_rebuilt_checkpoints_kept_are_bounded(monkeypatch, tmp_path):
    """Each process keeps its last two rebuilt checkpoints; older ones are deleted."""
    monkeypatch.setattr(reference, "_rebuilt", [])
    monkeypatch.setattr(reference, "_rebuilt_dir", tmp_path)
    calls = []
    monkeypatch.setattr(reference, "rebuilt_state", lambda d, m: calls.append(d.name) or {"w": np.zeros(2)})
    paths = [rebuilt_checkpoint(tmp_path / name, {}) for name in ("a", "b", "a", "c")]
    assert calls == ["a", "b", "c"]  # the second "a" was still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "c.ckpt"]
    assert paths[0] == paths[2] and paths[3].is_file()


def test_synthesised_values_follow_the_recipe():
    recipe = {"mean": 0.25, "std": 0.5, "lo": -0.4, "hi": 2.0}
    v = synthesise("blocks.0.mlp.fc1.weight", (512, 256), recipe, seed=0)
    assert v.dtype == np.float32 and v.shape == (512, 256)
    assert v.min() >= -0.4 and v.max() <= 2.0 and v.min() == np.float32(-0.4)  # clipped below
    unclipped = synthesise("w", (1 << 18,), {"mean": 0.25, "std": 0.5, "lo": -9.0, "hi": 9.0}, seed=0)
    assert abs(unclipped.mean() - 0.25) < 5e-3 and abs(unclipped.std() - 0.5) < 5e-3
    assert abs(unclipped.max() - (0.25 + 0.5 * 3 ** 0.5)) < 1e-3  # uniform: the range is mean +- sqrt(3) std


def test_synthesised_values_depend_on_name_and_seed_only():
    recipe = recipe_of(np.linspace(-1.0, 1.0, 101))
    assert recipe["lo"] == -1.0 and recipe["hi"] == 1.0 and recipe["mean"] == pytest.approx(0.0, abs=1e-15)
    a = synthesise("a.weight", (300, 300), recipe, seed=0)
    assert np.array_equal(a, synthesise("a.weight", (300, 300), recipe, seed=0))
    assert not np.array_equal(a, synthesise("b.weight", (300, 300), recipe, seed=0))
    assert not np.array_equal(a, synthesise("a.weight", (300, 300), recipe, seed=1))
    # the stream does not depend on the shape: the first values of a longer tensor are the same
    assert np.array_equal(a.ravel(), synthesise("a.weight", (90000 * 2,), recipe, seed=0)[:90000])


def test_only_large_float32_parameters_get_recipes():
    assert needs_recipe("float32", (MIN_NUMEL,)) and needs_recipe("float32", (256, 256))
    assert not needs_recipe("float32", (MIN_NUMEL - 1,))
    assert not needs_recipe("float16", (1024, 1024)) and not needs_recipe("int32", (1024, 1024))
