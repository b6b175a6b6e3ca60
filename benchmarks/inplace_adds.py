"""What writing the residual adds back in place is worth: a converted model with its adds
turned out of place again (as torch.fx traced them) timed against the one cspify returns.

    python benchmarks/inplace_adds.py                     # resnet50, batch 16
    python benchmarks/inplace_adds.py resnext50_32x4d --threads 1
"""

from __future__ import annotations

import argparse
import copy
import operator

import torch
import cspify
from common import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet50", help="a torchvision model name")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [1, as cspify bench]")
    args = parser.parse_args()

    x = torch.randn(1, 3, 224, 224)
    csp = cspify.convert(build(args.model), x)
    out_of_place = copy.deepcopy(csp)
    restored = 0
    for node in out_of_place.graph.nodes:
        if node.op == "call_method" and node.target == "add_":
            node.op, node.target = "call_function", operator.add
            restored += 1
    out_of_place.recompile()
    print(f"{args.model}: {restored} residual adds in place; 'original' below has them out of place")
    print(cspify.benchmark(out_of_place, csp, x, (args.batch,), args.threads))


if __name__ == "__main__":
    main()
