"""How steady is a latency ratio? Run cspify.benchmark several times on one model pair and
compare the spread of the two ratios it reports (medians, fastest blocks).

    python benchmarks/stability.py                          # resnet50, batch 16, 4 repeats
    python benchmarks/stability.py resnext50_32x4d --threads 1 --repeats 6

Each repeat is a full benchmark call (fresh copies of both models, warm-up, 5 alternating
rounds). A ratio that moves little between repeats can be quoted from a single run.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

import cspify
from common import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet50", help="a torchvision model name")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [1, as cspify bench]")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()

    x = torch.randn(1, 3, 224, 224)
    model = build(args.model)
    csp = cspify.convert(model, x)
    rows = []
    for repeat in range(1, args.repeats + 1):
        row = cspify.benchmark(model, csp, x, (args.batch,), args.threads, min_run_time=args.min_run_time).rows[0]
        rows.append([repeat, f"{row.original.min_ms:.1f}", f"{row.converted.min_ms:.1f}",
                     row.latency_ratio, row.fastest_ratio])
        print(f"repeat {repeat}: medians {row.latency_ratio:.3f}, fastest {row.fastest_ratio:.3f}", flush=True)
    threads = args.threads or torch.get_num_threads()
    print(f"\n{args.model}, batch {args.batch}, {threads} thread(s), torch {torch.__version__}")
    print(tabulate(rows, headers=["repeat", "original min ms", "converted min ms", "ratio (medians)",
                                  "ratio (fastest)"], floatfmt=".3f", tablefmt="github"))
    for label, column in (("medians", 3), ("fastest", 4)):
        values = [r[column] for r in rows]
        print(f"ratio of {label}: {min(values):.3f} to {max(values):.3f} (range {max(values) - min(values):.3f})")


if __name__ == "__main__":
    main()
