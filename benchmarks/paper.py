"""cspify's conversion next to the CSPNet paper and timm's hand-designed CSP models, with
measured CPU latency, written to BENCHMARKS.md in the repo root (its own three sections; the
sections other scripts write there, as benchmarks/detectors.py's, are kept as they are).

    python benchmarks/paper.py                     # every model below, threads = torch's default
    python benchmarks/paper.py --threads 1 resnet50 resnext50_32x4d
    python benchmarks/paper.py --min-run-time 2 --out /tmp/B.md
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/paper.py --threads 1

For each model: gamma 0.5, fusion last, inner widths kept, 1x3x224x224, fvcore flops and
params, original vs converted; the paper's reported change (shared/CSPNET.md, darknet
counts at 256x256); timm's hand-designed CSP model vs its plain counterpart (fvcore);
then both models timed side by side with cspify.benchmark at batch 1, 8 and 16 (ratio of
median latencies, the ratio of the fastest blocks beside it; "lat/flops" is the latency
saved over the flops saved: 1.0 means the time fell as much as the flops); then the stages
chosen by measured time (objective latency) and timed again, and a flops budget of 0.7
for resnet50, densenet121 and mobilenet_v2 (issue 14's targets). Run it on a quiet
machine: the header says how noisy the timings were.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import cspify
from common import PAPER_KINDS, build, pct
from cspify.budget import Search
from cspify.errors import CspifyError
from cspify.measure import measure
from cspify.record import conversion_of

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5  # turns each model takes in cspify.benchmark, per batch size
# shared/CSPNET.md, "Figures the paper reports": (flops change %, params change %).
PAPER = {
    "resnet50": (-8, -5),
    "resnext50_32x4d": (-22, -8),
    "darknet53": (-30, -34),
    "densenet201": (-19, +4),  # the paper's DenseNet-201-Elastic
    "mobilenet_v2": (-11, -28),
}
# timm's hand-designed CSP models and their plain counterparts.
HAND = {"resnet50": ("resnet50", "cspresnet50"), "resnext50_32x4d": ("resnext50_32x4d", "cspresnext50"),
        "darknet53": ("darknet53", "cspdarknet53")}
MODELS = ["resnet50", "resnext50_32x4d", "densenet121", "densenet201", "mobilenet_v2", "timm:darknet53",
          "efficientnet_b0", "mnasnet1_0", "mobilenet_v3_large"]
BUDGET_MODELS = ("resnet50", "densenet121", "mobilenet_v2")  # --target-flops 0.7 (issue 14)


def hand_designed(name: str, x: torch.Tensor) -> str:
    if name not in HAND:
        return ""
    plain, csp = (measure(build(f"timm:{n}"), x).totals for n in HAND[name])
    return f"{HAND[name][1]}: {pct(plain.flops, csp.flops)} / {pct(plain.params, csp.params)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [torch's default]")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per model, round and batch size")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    x = torch.randn(1, 3, 224, 224)
    size_rows, latency_rows, objective_rows, budget_rows, spreads, kernel = [], [], [], [], [], []
    for spec in args.models:
        name = spec.split(":")[-1]
        print(f"{name} ...", flush=True)
        model = build(spec)
        try:
            csp = cspify.convert(model, x, gamma=0.5, kinds=PAPER_KINDS)
        except CspifyError as error:
            size_rows.append([name, "not converted", "", "", "", "", error.message[:80]])
            continue
        report = cspify.compare(model, csp, x)
        o, c = report.original, report.converted
        paper = PAPER.get(name)
        stages = f"{sum(r.converted for r in report.stages)}/{len(report.stages)}"
        size_rows.append([
            name, stages, f"{o.flops / 1e9:.2f} -> {c.flops / 1e9:.2f}", pct(o.flops, c.flops),
            pct(o.params, c.params), f"{paper[0]:+d}% / {paper[1]:+d}%" if paper else "", hand_designed(name, x),
        ])
        result = cspify.benchmark(model, csp, x, sizes, threads, min_run_time=args.min_run_time, rounds=ROUNDS)
        flops_saved = 1 - c.flops / o.flops
        for row in result.rows:
            spreads += [t.spread for t in (row.original, row.converted)]
            kernel += [t.kernel_share for t in (row.original, row.converted)]
            latency_rows.append([
                name, row.batch_size,
                *(f"{t.median_ms:.1f} ± {t.iqr_ms:.1f} ({t.min_ms:.1f})" for t in (row.original, row.converted)),
                f"{row.latency_ratio:.3f}", f"{row.fastest_ratio:.3f}", f"{c.flops / o.flops:.3f}",
                f"{row.latency_saved / flops_saved:.2f}",
            ])
        objective_rows += by_time(model, x, sizes, threads, args.min_run_time, name, o.flops)
        if name in BUDGET_MODELS:
            budget = cspify.convert(model, x, target_flops=0.7, kinds=PAPER_KINDS)
            landed = cspify.compare(model, budget, x).converted.flops / o.flops
            budget_rows.append([name, "0.7", f"{landed:.3f}", f"{landed - 0.7:+.3f}",
                                ", ".join(f"{s.name} {s.gamma:g}/{s.hidden}" for s in conversion_of(budget).converted)])
    write(args.out, size_rows, latency_rows, spreads, max(kernel, default=0.0), threads, args.min_run_time,
          objective_rows, budget_rows)
    print(f"wrote {args.out}")


def by_time(model, x, sizes, threads, min_run_time, name, flops) -> list[list[str]]:
    """``--objective latency`` (stages timed on the CPU at batch 1, in the converted model with
    and without each), then both models timed as above: is any model slower after conversion?"""
    search = Search(batch_size=1, threads=threads, device="cpu", min_run_time=min_run_time, rounds=ROUNDS)
    try:
        csp = cspify.convert(model, x, objective="latency", search=search, kinds=PAPER_KINDS)
    except CspifyError as error:
        return [[name, "none pays", "", "", error.message[:80]]]
    record = conversion_of(csp)
    ratio = cspify.compare(model, csp, x).converted.flops / flops
    result = cspify.benchmark(model, csp, x, sizes, threads, min_run_time=min_run_time, rounds=ROUNDS)
    return [[name, f"{len(record.converted)}/{len(record.stages)}", f"{ratio:.3f}", row.batch_size,
             f"{row.latency_ratio:.3f}"] for row in result.rows]


def write(path, size_rows, latency_rows, spreads, kernel, threads, min_run_time, objective_rows=(),
          budget_rows=()) -> None:
    worst = max(spreads, default=0.0)
    noisy = worst > 0.10
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    allocator = " ".join(f"`{t}`" for t in tuned) if tuned else "default settings"
    command = " ".join([*tuned, "python", "benchmarks/paper.py", *sys.argv[1:]])
    header = [
        "# Benchmarks: cspify against the CSPNet paper",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}: torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} intra-op thread(s), "
        f"load average {load:.1f} at the end.",
        "",
        f"Allocator: glibc malloc, {allocator}; the kernel took at most {100 * kernel:.0f}% of the CPU time while a "
        "model was timed.",
        "",
    ]
    if noisy:
        header += [
            f"> **Noisy timings.** The largest interquartile range was {100 * worst:.0f}% of its median: this "
            "machine was shared with other work while it ran. Flops and params are exact; treat the latency "
            f"ratios as rough and re-run `{command}` on a quiet machine.",
            "",
        ]
    body = [
        "## Size: cspify at gamma 0.5 vs the paper and timm's hand-designed CSP models",
        "",
        "fvcore at 1x3x224x224 (one multiply-add = one flop); fusion last, inner widths kept. The paper's figures "
        "are darknet counts at 256x256 of the authors' redesigned models (DenseNet-201 there is DenseNet-201-Elastic); "
        "timm's are other depths and widths by hand. Both are references, not the same transform.",
        "",
        tabulate(size_rows, headers=["model", "stages", "GFLOPs", "flops", "params", "paper flops / params",
                                     "timm hand-designed flops / params"], tablefmt="github"),
        "",
        "## Latency: both models timed side by side on CPU",
        "",
        f"`cspify.benchmark` (torch.utils.benchmark, warm-up, blocked_autorange, {min_run_time:g} s per model and "
        f"round, {ROUNDS} rounds alternating the models): median ms ± IQR (fastest block). latency ratio = converted / "
        "original median; of fastest: the same from each model's fastest block; lat/flops = latency saved / "
        "flops saved, from the latency ratio (1.0: time fell as much as flops; issue 14 asks for 0.8 at batch 1 and 8). How far "
        "the ratios move between whole runs: `python benchmarks/stability.py MODEL`. Where lat/flops is low (the "
        "depthwise models), `python benchmarks/where_time_goes.py MODEL --batch 1,8 --threads 1 --fold` shows what "
        "the time is spent on, op group by op group.",
        "",
        tabulate(latency_rows, headers=["model", "batch", "original ms", "converted ms", "latency ratio",
                                        "of fastest", "flops ratio", "lat/flops"], tablefmt="github"),
        "",
        "## Choosing stages by time, and a flops budget",
        "",
        "`objective=\"latency\"`: each stage timed on the CPU at batch 1, in the model with every stage converted "
        "against the model with it left whole; only the stages the model runs faster with are converted. Then "
        "both models timed as above (latency ratio = converted / original median): a ratio above 1 would be a "
        "model slower after conversion. `target_flops=0.7`: per-stage gamma and inner widths chosen so the model "
        "keeps 70% of the original's flops (fvcore).",
        "",
        tabulate(objective_rows, headers=["model", "stages kept", "flops ratio", "batch", "latency ratio"],
                 tablefmt="github"),
        "",
        tabulate(budget_rows, headers=["model", "target flops", "landed", "off by", "per stage: gamma/hidden"],
                 tablefmt="github"),
        "",
    ]
    others = other_sections(path)
    Path(path).write_text("\n".join(header + body) + ("\n" + "\n".join(others) if others else ""))


OWN_SECTIONS = ("## Size:", "## Latency:", "## Choosing stages")


def other_sections(path) -> list[str]:
    """The sections of the file at ``path`` that other scripts write (benchmarks/detectors.py's
    "## Detectors"), kept as they are when this script rewrites its own."""
    if not Path(path).exists():
        return []
    parts = re.split(r"(?m)^(?=## )", Path(path).read_text())
    return [part.rstrip("\n") + "\n" for part in parts[1:] if not part.startswith(OWN_SECTIONS)]


if __name__ == "__main__":
    main()
