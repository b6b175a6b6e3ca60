"""Do stages' times add up? Each stage timed alone against the original, and in the model
with every stage converted against that model with the stage left whole, side by side.

    python benchmarks/stage_times.py                           # mobilenet_v2, batch 1, one thread
    python benchmarks/stage_times.py --repeats 3               # each stage in context three times
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/stage_times.py resnet50 --batch 8

Why ``--objective latency`` times each stage where it will run (``cspify.budget``): if the
"alone" column says every stage costs time while the whole conversion saves it, stages do
not add up, and only the "in context" column says which ones pay. ``--repeats 3`` times each
stage in context three times: a stage whose effect lies within the noise pays in some runs
and not in others (the objective decides on one). Random weights, gamma 0.5,
1x3x224x224 repeated to the batch, every option at its default; ``cspify.benchmark`` (median of ``--rounds`` rounds, the
models alternating).
"""

from __future__ import annotations

import argparse

import torch
from common import build
from tabulate import tabulate

import cspify
from cspify.record import conversion_of


def timed(a, b, x, args) -> tuple[float, float]:
    row = cspify.benchmark(a, b, x, batch_sizes=(args.batch,), threads=args.threads,
                           min_run_time=args.min_run_time, rounds=args.rounds).rows[0]
    return row.original.median_ms, row.converted.median_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="times each stage is timed in context [1]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x = build(args.model), torch.randn(1, 3, 224, 224)
    everything = cspify.convert(model, x)
    names = [s.name for s in conversion_of(everything).converted]
    rows = []
    for name in names:
        original, alone = timed(model, cspify.convert(model, x, stages=[name]), x, args)
        others = [n for n in names if n != name]
        without = cspify.convert(model, x, stages=others) if others else model
        runs = [timed(without, everything, x, args) for _ in range(args.repeats)]
        before, after = runs[0]
        rows.append([name, f"{original:.2f}", f"{alone:.2f}", f"{alone / original - 1:+.1%}",
                     f"{before:.2f}", f"{after:.2f}", " / ".join(f"{a / b - 1:+.1%}" for b, a in runs),
                     f"{sum(a < b for b, a in runs)} of {len(runs)}"])
    original, converted = timed(model, everything, x, args)
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s): every stage converted "
          f"{converted:.2f} ms against {original:.2f} ms ({converted / original - 1:+.1%})\n")
    print(tabulate(rows, headers=["stage", "original ms", "alone ms", "alone", "without it ms", "all ms", "in context",
                                  "pays in"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
