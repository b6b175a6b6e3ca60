"""Where the forward time goes, original vs converted: why latency falls less (or more)
than flops.

    python benchmarks/where_time_goes.py                                  # resnext50_32x4d, batch 16
    python benchmarks/where_time_goes.py resnet50 --batch 16 --threads 1

Two views of each model, over three timed forward passes after a warm-up:
- per ATen op (torch.profiler): the share of self CPU time of convs, norms, concats,
  copies and adds, so the split/concat overhead of the CSP rewrite shows as a number;
- per conv kind (forward hooks): 1x1, grouped or depthwise, and dense kxk convs, their
  share of the conv flops next to their share of the forward time.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

import cspify
from common import build

GROUPS = ("conv", "norm", "cat", "copy", "add", "relu", "pool", "other")


def group_of(op: str) -> str:
    """An ATen op name's group, e.g. aten::mkldnn_convolution -> conv."""
    name = op.removeprefix("aten::")
    if "convolution" in name:
        return "conv"
    if "norm" in name:
        return "norm"
    if name in ("cat", "copy_", "add", "add_"):
        return name.rstrip("_")
    if "relu" in name or "clamp_min" in name:
        return "relu"
    return "pool" if "pool" in name else "other"


def op_shares(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    shares, total = defaultdict(float), 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        shares[group_of(event.key)] += event.self_cpu_time_total
    return {group: value / total for group, value in shares.items()}


def conv_kind(conv: nn.Conv2d) -> str:
    if conv.kernel_size == (1, 1) and conv.groups == 1:
        return "1x1"
    return "grouped/depthwise" if conv.groups > 1 else "dense kxk"


def conv_shares(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, tuple[float, float]], float]:
    seconds, flops, hooks = defaultdict(float), defaultdict(int), []

    def start(module, args):
        module._cspify_start = time.perf_counter()

    def stop(module, args, out):
        seconds[conv_kind(module)] += time.perf_counter() - module._cspify_start
        k = module.kernel_size[0] * module.kernel_size[1]
        flops[conv_kind(module)] += out.numel() * module.in_channels // module.groups * k

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    with torch.inference_mode():
        model(x)
        seconds.clear()
        flops.clear()
        begin = time.perf_counter()
        for _ in range(3):
            model(x)
        forward = time.perf_counter() - begin
    for hook in hooks:
        hook.remove()
    total_flops = sum(flops.values())
    return {kind: (flops[kind] / total_flops, seconds[kind] / forward) for kind in flops}, forward / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnext50_32x4d", help="a torchvision model name")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [torch's default]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    example = torch.randn(1, 3, 224, 224)
    original = build(args.model)
    models = {"original": original, "converted": cspify.convert(original, example).eval()}
    x = example.repeat(args.batch, 1, 1, 1)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} thread(s)\n")

    ops = {name: op_shares(model, x) for name, model in models.items()}
    print("share of self CPU time per op (torch.profiler)")
    print(tabulate([[g, *(f"{100 * ops[n].get(g, 0):.1f}%" for n in models)] for g in GROUPS],
                   headers=["op", *models], tablefmt="github"))
    for name, model in models.items():
        kinds, forward = conv_shares(model, x)
        print(f"\n{name}: forward {1e3 * forward:.0f} ms; convs by kind")
        print(tabulate([[k, f"{100 * f:.0f}%", f"{100 * t:.0f}%"] for k, (f, t) in sorted(kinds.items())],
                       headers=["conv kind", "of conv flops", "of forward time"], tablefmt="github"))


if __name__ == "__main__":
    main()
