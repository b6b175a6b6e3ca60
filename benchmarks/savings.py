"""Flops and params saved by the mechanical CSP transform, next to the hand-built
reference in shared/CSPNET.md (fusion last, inner widths kept, 224x224, fvcore).

    python benchmarks/savings.py                 # gamma 0.5, the README's table
    python benchmarks/savings.py --gamma 0.75
"""

import argparse

import torch
from tabulate import tabulate

import cspify
from common import PAPER_KINDS, build, pct

# shared/CSPNET.md, "What a mechanical transform gives": flops and params change at gamma 0.5.
REFERENCE = {
    "resnet50": (-10.1, -8.8),
    "resnext50_32x4d": (-24.2, -23.5),
    "resnet152": (-18.8, -17.3),
    "wide_resnet50_2": (-9.0, -8.5),
    "densenet121": (-11.8, None),
    "densenet201": (-10.0, None),
}
MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "resnet152", "wide_resnet50_2", "densenet121", "densenet201"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("models", nargs="*", default=MODELS)
    args = parser.parse_args()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    for name in args.models:
        model = build(name)
        csp = cspify.convert(model, x, gamma=args.gamma, kinds=PAPER_KINDS)
        report = cspify.compare(model, csp, x)
        before, after = report.original, report.converted
        converted = sum(row.converted for row in report.stages)
        ref_flops, ref_params = REFERENCE.get(name, (None, None)) if args.gamma == 0.5 else (None, None)
        rows.append([
            name, f"{converted}/{len(report.stages)}",
            f"{before.flops / 1e9:.2f} -> {after.flops / 1e9:.2f}", pct(before.flops, after.flops),
            f"{ref_flops:+.1f}%" if ref_flops is not None else "",
            f"{before.params / 1e6:.2f} -> {after.params / 1e6:.2f}", pct(before.params, after.params),
            f"{ref_params:+.1f}%" if ref_params is not None else "",
            pct(before.memory_bytes, after.memory_bytes),
        ])
    print(f"gamma {args.gamma}, fusion last, hidden keep, 1x3x224x224, fvcore (1 multiply-add = 1 flop); "
          f"stages: the paper's kinds only ({', '.join(PAPER_KINDS)}), as the reference counts them\n")
    print(tabulate(rows, headers=["model", "stages", "GFLOPs", "flops", "reference", "params (M)", "params",
                                  "reference", "memory traffic"], tablefmt="github"))


if __name__ == "__main__":
    main()
