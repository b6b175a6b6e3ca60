"""What rounding narrowed widths to a multiple of 16 (``round_to=16``, ``--round-to 16``) is
worth on this machine: single convs at widths on and off multiples of 16, then converted
models with and without it.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/channel_multiples.py

1. A 3x3 depthwise conv and a 1x1 conv (144 outputs) at 56x56, for input widths 64 to 144
   in steps of 8 (torch.utils.benchmark, median): time per channel shows where the
   kernel leaves its fast path. Then a depthwise conv at mobilenet_v2's stage widths and at
   half of them (what ``hidden="scale"`` at gamma 0.5 leaves): how far its time follows.
2. Each model converted with inner widths scaled (where gamma leaves widths such as 72),
   at gamma 0.5 and 0.375 (what a budget picks), once as cspify rounds by default and once
   with round_to=16; both folded for inference and timed side by side
   (``cspify.benchmark``); "rounded / plain" is the latency ratio of the two.
Random weights, 1x3x224x224 repeated to each batch size, one thread by default.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.utils import benchmark

import cspify
from common import build


def conv_ms(conv: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        timer = benchmark.Timer("conv(x)", globals={"conv": conv, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def single_convs(sizes: tuple[int, ...]) -> list[list[str]]:
    rows = []
    for channels in range(64, 145, 8):
        row = [channels, "yes" if channels % 16 == 0 else ""]
        for batch in sizes:
            x = torch.randn(batch, channels, 56, 56)
            depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels).eval()
            pointwise = nn.Conv2d(channels, 144, 1).eval()
            ms = conv_ms(depthwise, x)
            row += [f"{ms:.3f}", f"{1e3 * ms / channels:.2f}", f"{conv_ms(pointwise, x):.3f}"]
        rows.append(row)
    return rows


def halved(sizes: tuple[int, ...]) -> list[list[str]]:
    """A depthwise conv at the widths of mobilenet_v2's stages and at half of them: on small
    maps its time falls by far less than half."""
    rows = []
    for channels, side in ((144, 56), (192, 28), (576, 14), (960, 7)):
        row = [f"{channels} -> {channels // 2}", f"{side}x{side}"]
        for batch in sizes:
            full, half = (conv_ms(nn.Conv2d(c, c, 3, padding=1, groups=c).eval(), torch.randn(batch, c, side, side))
                          for c in (channels, channels // 2))
            row += [f"{full:.3f}", f"{half:.3f}", f"{half / full:.2f}"]
        rows.append(row)
    return rows


def models(names: list[str], sizes: tuple[int, ...], args) -> list[list[str]]:
    rows = []
    for name in names:
        model, x = build(name), torch.randn(1, 3, 224, 224)
        for gamma in (0.5, 0.375):
            pair = [cspify.convert(model, x, gamma=gamma, hidden="scale", round_to=r).eval() for r in (1, 16)]
            reports = [cspify.compare(model, m, x) for m in pair]
            flops = [r.converted.flops / r.original.flops for r in reports]
            plain, rounded = (cspify.fuse_for_inference(m, x) for m in pair)
            result = cspify.benchmark(plain, rounded, x, sizes, args.threads, min_run_time=args.min_run_time,
                                      rounds=args.rounds)
            for row in result.rows:
                rows.append([name, gamma, row.batch_size, f"{flops[0]:.3f}", f"{flops[1]:.3f}",
                             f"{row.original.median_ms:.2f}", f"{row.converted.median_ms:.2f}",
                             f"{row.latency_ratio:.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    headers = ["channels", "multiple of 16"]
    for batch in sizes:
        headers += [f"depthwise ms b{batch}", f"us/channel b{batch}", f"1x1 ms b{batch}"]
    print(tabulate(single_convs(sizes), headers=headers, tablefmt="github"))
    print()
    headers = ["depthwise channels", "map"]
    for batch in sizes:
        headers += [f"ms b{batch}", f"halved ms b{batch}", f"ratio b{batch}"]
    print(tabulate(halved(sizes), headers=headers, tablefmt="github"))
    print()
    print(tabulate(models(args.models, sizes, args),
                   headers=["model", "gamma", "batch", "flops plain", "flops round_to=16", "plain ms", "rounded ms",
                            "rounded / plain"], tablefmt="github"))


if __name__ == "__main__":
    main()
