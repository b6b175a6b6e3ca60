"""What folding norms into convs is worth to a converted model: both models timed side by
side as they are, then both folded for inference (``cspify.fuse_for_inference``).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/folded.py mobilenet_v2

The CSP rewrite adds a partial transition per stage (a 1x1 conv, a norm, an activation): on
small mobile models that is a share of ops, not of flops, and the norms are the part that
folding removes. Random weights, gamma 0.5, 1x3x224x224 repeated to each batch size, one
thread by default.
"""

from __future__ import annotations

import argparse

import torch
from common import build
from tabulate import tabulate

import cspify


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["mobilenet_v2"])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    rows = []
    for name in args.models:
        model, x = build(name), torch.randn(1, 3, 224, 224)
        csp = cspify.convert(model, x).eval()
        flops = cspify.compare(model, csp, x)
        ratio = flops.converted.flops / flops.original.flops
        pairs = {"as they are": (model, csp),
                 "both folded": (cspify.fuse_for_inference(model, x), cspify.fuse_for_inference(csp, x))}
        for how, (a, b) in pairs.items():
            result = cspify.benchmark(a, b, x, sizes, args.threads, "cpu", min_run_time=args.min_run_time,
                                      rounds=args.rounds)
            for row in result.rows:
                saved = (1 - row.latency_ratio) / (1 - ratio)
                rows.append([name, how, row.batch_size, f"{row.original.median_ms:.2f}", f"{row.converted.median_ms:.2f}",
                             f"{row.latency_ratio:.3f}", f"{ratio:.3f}", f"{saved:.2f}"])
    print(tabulate(rows, headers=["model", "models", "batch", "original ms", "converted ms", "latency ratio",
                                  "flops ratio", "latency saved / flops saved"], tablefmt="github",
                   disable_numparse=True))


if __name__ == "__main__":
    main()
