"""How far float32 rounding alone moves a model's features, against how far the inference path is from eager.

For each model (random init, random BatchNorm statistics drawn by
``tests/test_inference.py``, its smallest input, batch 1) this prints, as
fractions of the largest output magnitude: the inference path against eager
float32; eager float32 against eager float64; the largest change of eager
float32's output when the input changes by one ulp (three draws); and the
inference path against eager, both in float64 (what the transformations
themselves change).

    python benchmarks/inference_rounding.py halonet_50t resnest200 seresnet101 resnet50
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import featurezoo as fz
from featurezoo.freezing import probe_input_size

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_inference import _max_rel_err as rel_err, _one_ulp_moves as one_ulp_moves  # noqa: E402
from tests.test_inference import _randomise_norms as randomise_norms  # noqa: E402  the test's statistics


def main(names) -> int:
    print(f"{'model':20} {'infer vs eager f32':>18} {'eager f32 vs f64':>16} {'one-ulp input move':>18} "
          f"{'infer vs eager f64':>18}")
    for name in names:
        gen = torch.Generator().manual_seed(0)
        model = fz.create_model(name, features_only=True).eval()
        randomise_norms(model, gen)
        h, w = probe_input_size(model.default_cfg)
        x = torch.randn(1, model.default_cfg.input_size[0], h, w, generator=gen)
        with torch.no_grad():
            ref = model(x)
            fast = rel_err(ref, fz.optimize_for_inference(model, example_input=x, linear="onednn")(x))
            moves = one_ulp_moves(model, x, ref)
            model, x = model.double(), x.double()
            exact = model(x)
            eager = rel_err(exact, ref)
            fast64 = rel_err(exact, fz.optimize_for_inference(model, example_input=x, linear="onednn")(x))
        print(f"{name:20} {fast:18.3g} {eager:16.3g} {max(moves):18.3g} {fast64:18.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["halonet_50t", "resnest200", "seresnet101", "resnet50"]))
