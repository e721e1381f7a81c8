"""Write tests/data/mobilevit/: MindCV's own MobileViT block on maps whose sides are not a
multiple of its 2x2 patch, for tests/test_mobilevit.py.

The MindCV parity reference runs MobileViT at 64 px, where every transformer stage has even
sides (8, 4, 2) and the unfolding never resizes. This fixture covers the other case: MindCV
resizes such a map up to the next multiple of the patch (bilinear, align_corners=True),
attends, folds and resizes back (at 224 px, layer_5's 7x7 map is attended as 8x8). A small
block (8 -> 12 channels, transformer width 16, two layers) with randomised norms is run on
7x9 and 10x5 maps; its checkpoint (MindSpore's save_checkpoint) and outputs are saved.

Run under the MindCV environment (MindCV 0.3.0, MindSpore 2.10):

    $MSPY tools/make_mobilevit_fixture.py [--out tests/data/mobilevit]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import mindspore as ms
from mindcv.models.mobilevit import MobileViTBlock

SIZES = ((7, 9), (10, 5))


def _randomise_norms(block: ms.nn.Cell, rng: np.random.RandomState) -> None:
    for _, cell in block.cells_and_names():
        for attr, draw in (("gamma", lambda s: rng.uniform(0.5, 1.5, s)), ("beta", lambda s: rng.normal(0, 0.2, s)),
                           ("moving_mean", lambda s: rng.normal(0, 0.2, s)),
                           ("moving_variance", lambda s: rng.uniform(0.5, 1.5, s))):
            p = getattr(cell, attr, None)
            if isinstance(p, ms.Parameter):
                p.set_data(ms.Tensor(draw(p.shape).astype(np.float32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "mobilevit"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ms.set_seed(0)
    block = MobileViTBlock(in_channels=8, out_channels=12, transformer_dim=16, ffn_dim=32, n_transformer_blocks=2,
                           head_dim=8, patch_h=2, patch_w=2)
    _randomise_norms(block, np.random.RandomState(1))
    block.set_train(False)
    ms.save_checkpoint(block, str(out / "block.ckpt"))
    os.chmod(out / "block.ckpt", 0o644)  # MindSpore writes it 0o400
    rng = np.random.RandomState(0)
    arrays = {}
    for h, w in SIZES:
        x = rng.standard_normal((2, 8, h, w)).astype(np.float32)
        arrays[f"input_{h}x{w}"] = x
        arrays[f"output_{h}x{w}"] = block(ms.Tensor(x)).asnumpy()
    np.savez(out / "block_outputs.npz", **arrays)
    print(f"wrote {out}: {sorted(arrays)}")


if __name__ == "__main__":
    main()
    os._exit(0)  # MindSpore's threads can hang the interpreter's exit
