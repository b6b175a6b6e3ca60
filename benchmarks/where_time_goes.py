"""Where the forward time goes, original vs converted: why latency falls less (or more)
than flops.

    python benchmarks/where_time_goes.py                                   # resnext50_32x4d, batch 16
    python benchmarks/where_time_goes.py mobilenet_v2 --batch 1,8 --threads 1
    python benchmarks/where_time_goes.py mobilenet_v2 --hidden scale --fold

For each batch size, both models are profiled (torch.profiler, self CPU time per ATen op)
in turns, after one discarded profile each; each op group's time is the median over the
rounds (5 profiles of 10 forwards each). Convs are grouped by their weight's shape: 1x1,
depthwise or grouped, dense kxk; beside their time, their multiply-adds (forward hooks), so
"saved" can be read against "MACs saved" group by group. The concats, narrows and copies
the CSP rewrite adds show in their own rows. The last line says what the MACs saved would
buy on this machine were each conv group's time to fall as its MACs did and every other
op's to stay, and the minor page faults per forward of each model (getrusage: a tensor
over 32 MiB is mapped afresh on every forward, whatever glibc's thresholds). ``--fold``
times both models with norms folded into convs (cspify.fuse_for_inference), as a deployed
model runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

import cspify
from common import build

ACTIVATIONS = ("relu", "clamp", "hardtanh", "silu", "hardswish", "sigmoid", "hardsigmoid", "gelu", "mish")
GROUPS = ("conv 1x1", "conv depthwise/grouped", "conv kxk", "norm", "activation", "mul (SE)", "add",
          "cat", "copy", "narrow/view", "pool", "linear", "other")


def conv_group(weight: list[int], input_shape: list[int]) -> str:
    """A conv's group from its weight's shape [out, in/groups, kh, kw] and its input's shape."""
    if len(input_shape) > 1 and weight[1] < input_shape[1]:
        return "conv depthwise/grouped"
    return "conv 1x1" if all(k == 1 for k in weight[2:]) else "conv kxk"


def group_of(op: str, shapes: list[list[int]]) -> str:
    """The group an ATen op's self time counts to, e.g. aten::mkldnn_convolution -> conv 1x1."""
    name = op.removeprefix("aten::").rstrip("_")
    if name in ("mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d", "_convolution_depthwise2d"):
        return conv_group(shapes[1], shapes[0]) if len(shapes) > 1 and len(shapes[1]) > 2 else "conv kxk"
    if "norm" in name:
        return "norm"
    if any(act in name for act in ACTIVATIONS):
        return "activation"
    if name in ("cat", "copy", "add", "mul"):
        return {"mul": "mul (SE)"}.get(name, name)
    if name in ("narrow", "slice", "view", "as_strided", "contiguous", "clone", "reshape", "flatten"):
        return "copy" if name in ("contiguous", "clone") else "narrow/view"
    if "pool" in name or name == "mean":
        return "pool"
    return "linear" if name in ("addmm", "linear", "mm") else "other"


def op_times(model: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Milliseconds of self CPU time per group, per forward, over ``runs`` forwards."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(runs):
            model(x)
    times = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        times[group_of(event.key, event.input_shapes)] += event.self_cpu_time_total / runs / 1e3
    return times


def conv_flops(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Multiply-adds per conv group in one forward (forward hooks on every Conv2d)."""
    flops, hooks = defaultdict(float), []

    def count(module, args, out):
        weight = list(module.weight.shape)
        k = weight[2] * weight[3]
        flops[conv_group(weight, list(args[0].shape))] += out.numel() * weight[1] * k

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(count))
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return flops


@dataclass
class Summary:
    time_saved: float    # of the original's profiled op time
    macs_saved: float    # of the original's conv MACs
    ceiling: float       # time saved were each conv group's time to fall as its MACs fell
    faults: tuple[float, float]  # minor page faults per forward, original and converted

    def __str__(self) -> str:
        return (f"time saved {100 * self.time_saved:.1f}%, conv MACs saved {100 * self.macs_saved:.1f}% "
                f"(time saved / MACs saved {self.time_saved / self.macs_saved:.2f}); were each conv group's time "
                f"to fall as its MACs did and the rest to stay, time saved {100 * self.ceiling:.1f}% "
                f"({self.ceiling / self.macs_saved:.2f} of the MACs saved); minor page faults per forward "
                f"{self.faults[0]:.0f} and {self.faults[1]:.0f}")


def compare(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, runs: int) -> tuple[list[list[str]], Summary]:
    faults = tuple(page_faults(model, x) for model in models.values())  # before the profiler allocates
    for model in models.values():  # the first profile in a process runs slow: discard one each
        op_times(model, x, 2)
    samples = {name: defaultdict(list) for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for group, ms in op_times(model, x, runs).items():
                samples[name][group].append(ms)
    times = {name: {g: statistics.median(v + [0.0] * (rounds - len(v))) for g, v in s.items()}
             for name, s in samples.items()}
    flops = {name: conv_flops(model, x) for name, model in models.items()}
    (a, b), (fa, fb) = times.values(), flops.values()
    rows = []
    for group in GROUPS:
        if a.get(group, 0) + b.get(group, 0) < 0.005:
            continue
        conv = group.startswith("conv")
        rows.append([group, f"{a.get(group, 0):.2f}", f"{b.get(group, 0):.2f}", f"{a.get(group, 0) - b.get(group, 0):+.2f}",
                     f"{fa.get(group, 0) / 1e9:.3f}" if conv else "", f"{fb.get(group, 0) / 1e9:.3f}" if conv else "",
                     f"{100 * (1 - fb.get(group, 0) / fa[group]):.0f}%" if conv and fa.get(group) else ""])
    ta, tb, ca, cb = sum(a.values()), sum(b.values()), sum(fa.values()), sum(fb.values())
    rows.append(["total", f"{ta:.2f}", f"{tb:.2f}", f"{ta - tb:+.2f}", f"{ca / 1e9:.3f}", f"{cb / 1e9:.3f}",
                 f"{100 * (1 - cb / ca):.0f}%"])
    # Were each conv group's time to fall as its MACs fell, and every other op's not at all:
    # the time saved that the MACs saved can buy on this machine.
    ceiling = sum(a.get(g, 0) * (1 - fb.get(g, 0) / fa[g]) for g in fa if fa[g])
    return rows, Summary(1 - tb / ta, 1 - cb / ca, ceiling / ta, faults)


def page_faults(model: nn.Module, x: torch.Tensor, runs: int = 5) -> float:
    """Minor page faults per forward (getrusage): activations mapped afresh on every forward."""
    with torch.inference_mode():
        model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(runs):
            model(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnext50_32x4d", help="a torchvision model name, or timm:NAME")
    parser.add_argument("--batch", default="16", help="batch sizes, comma-separated [16]")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [torch's default]")
    parser.add_argument("--hidden", default="keep", choices=("keep", "scale"), help="inner widths, as convert's")
    parser.add_argument("--fold", action="store_true", help="fold norms into convs in both models first")
    parser.add_argument("--rounds", type=int, default=5, help="profiles per model, in turns [5]")
    parser.add_argument("--runs", type=int, default=10, help="forwards per profile [10]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    example = torch.randn(1, 3, 224, 224)
    original = build(args.model)
    models = {"original": original, "converted": cspify.convert(original, example, hidden=args.hidden).eval()}
    if args.fold:
        models = {name: cspify.fuse_for_inference(model, example) for name, model in models.items()}
    for batch in (int(b) for b in args.batch.split(",")):
        print(f"\n{args.model}, hidden {args.hidden}{', norms folded' if args.fold else ''}, batch {batch}, "
              f"{torch.get_num_threads()} thread(s): ms per forward (median of {args.rounds} profiles)")
        rows, summary = compare(models, example.repeat(batch, 1, 1, 1), args.rounds, args.runs)
        print(tabulate(rows, headers=["op group", "original ms", "converted ms", "saved ms", "original GMACs",
                                      "converted GMACs", "MACs saved"], tablefmt="github"))
        print(summary)


if __name__ == "__main__":
    main()
