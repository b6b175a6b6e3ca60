"""Time `convert` and the full `compare` report on large models.

    python benchmarks/timing.py                       # resnet152 and densenet201
    python benchmarks/timing.py resnet50 densenet121  # any torchvision names

The issue's target: convert plus the full report under 10 s each on a 2-core machine.
Model construction (random init) is timed apart: it is torchvision's cost, not ours.
"""

import sys
import time

import torch
from tabulate import tabulate

import cspify
from common import build


def main(names: list[str]) -> None:
    torch.set_num_threads(torch.get_num_threads())
    x = torch.randn(1, 3, 224, 224)
    rows = []
    for name in names:
        start = time.perf_counter()
        model = build(name)
        built = time.perf_counter()
        csp = cspify.convert(model, x)
        converted = time.perf_counter()
        report = cspify.compare(model, csp, x)
        reported = time.perf_counter()
        rows.append([
            name, f"{built - start:.2f}", f"{converted - built:.2f}", f"{reported - converted:.2f}",
            f"{reported - built:.2f}", f"{report.to_dict()['saved_percent']['flops']:.1f}%",
        ])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["model", "build s", "convert s", "report s", "convert+report s", "flops saved"],
                   tablefmt="github"))


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet152", "densenet201"])
