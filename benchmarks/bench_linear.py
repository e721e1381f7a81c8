"""float32 ``nn.Linear`` on the CPU: PyTorch's ``F.linear`` (the BLAS) against oneDNN's linear, side by side.

The inference path swaps the kernel (``featurezoo.layers.linear.OneDnnLinear``,
``optimize_for_inference(linear="auto")``) where oneDNN is faster. This prints,
per layer shape of the transformer families at batch 8 and 224 px, the median
time of each kernel (rotating, in one process), their GFLOP/s and the ratio,
and the largest difference between the two outputs relative to the largest
output from the float64 product.

    python benchmarks/bench_linear.py                    # 2 threads, 7 repeats
    python benchmarks/bench_linear.py --threads 1 --repeats 15
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from bench_features import time_columns  # the same rotation of columns as the feature table

from featurezoo.layers.linear import onednn_linear

# (what, tokens, in, out): ViT-B/16 at 224 px (197 tokens), Swin-T / ConvNeXt-T stage 1 and 3 MLPs.
SHAPES = [
    ("vit_b qkv", 8 * 197, 768, 2304),
    ("vit_b mlp fc1", 8 * 197, 768, 3072),
    ("vit_b mlp fc2", 8 * 197, 3072, 768),
    ("swin_t stage1 fc1", 8 * 3136, 96, 384),
    ("swin_t stage1 fc2", 8 * 3136, 384, 96),
    ("convnext_t stage3 fc1", 8 * 196, 384, 1536),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, medians of {args.repeats} rotating repeats")
    print(f"{'layer':24} {'F.linear ms':>11} {'oneDNN ms':>9} {'GFLOP/s':>15} {'speed-up':>8} {'max diff':>9}")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for what, rows, cin, cout in SHAPES:
            x = torch.randn(rows, cin, generator=gen)
            w = torch.randn(cout, cin, generator=gen) * cin ** -0.5
            b = torch.randn(cout, generator=gen)
            kernels = {"aten": lambda inp: F.linear(inp, w, b), "onednn": lambda inp: onednn_linear(inp, w, b)}
            times = time_columns(kernels, x, args.repeats, warmup=1, device="cpu")
            med = {k: statistics.median(v) for k, v in times.items()}
            exact = F.linear(x.double(), w.double(), b.double())
            diff = max((kernels[k](x).double() - exact).abs().max().item() for k in kernels) / exact.abs().max().item()
            gflop = 2 * rows * cin * cout / 1e9
            rates = f"{gflop / med['aten']:6.1f} / {gflop / med['onednn']:6.1f}"
            print(f"{what:24} {med['aten'] * 1e3:11.2f} {med['onednn'] * 1e3:9.2f} {rates:>15} "
                  f"{med['aten'] / med['onednn']:8.2f} {diff:9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
