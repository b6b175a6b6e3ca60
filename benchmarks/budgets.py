"""A budget that reads accuracy against one that reads flops alone, and against Torch-Pruning,
all at 0.7x the original's flops; writes BUDGETS.md.

    python benchmarks/budgets.py                  # 3 models x 3 seeds, one process per model: 42 min on 2 shared cores
    python benchmarks/budgets.py --quick          # a smoke run (numbers meaningless)

Per model and seed, from the cached original of accuracy.py --ablations (20,000 images; run it first):

    flops     convert(target_flops=0.7): each stage's gamma and inner width chosen by flops
              alone (the cut spread evenly)
    measured  convert(target_flops=0.7, data=images): each stage alone at each option
              calibrated on 512 of the images and judged on 256 others against the original
              (KL of the logits), the options that lose least in sum chosen
    pruned    Torch-Pruning (L1 magnitude, uniform) to at most the flops the measured budget
              landed at

each scored calibrated (2,048 unlabeled images; the pruned model has nothing to calibrate)
and after 1 epoch of cspify.finetune: CE + logit distillation for all three (the issue's
"same loss"), and cspify's default (also every stage's output) for the converted ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402
import cspify  # noqa: E402
from cspify.budget import Search  # noqa: E402
from cspify.calibrate import calibrate  # noqa: E402

TARGET = 0.7
SEARCH = Search(gammas=(0.25, 0.375, 0.5, 0.625, 0.75), hidden=("keep", "scale"))
ROWS = [
    ("flops_calibrated", "flops budget, calibrated"),
    ("flops_kd_logits", "flops budget + 1 epoch, CE + logits"),
    ("flops_kd_stages", "flops budget + 1 epoch, CE + logits + stages (the default)"),
    ("measured_calibrated", "accuracy-aware budget, calibrated"),
    ("measured_kd_logits", "accuracy-aware budget + 1 epoch, CE + logits"),
    ("measured_kd_stages", "accuracy-aware budget + 1 epoch, CE + logits + stages (the default)"),
    ("pruned_before", "Torch-Pruning, before fine-tuning"),
    ("pruned_kd_logits", "Torch-Pruning + 1 epoch, CE + logits"),
]


def run_one(kind: str, seed: int, args, data: A.Data, log) -> dict:
    teacher, info = A.trained(kind, "original", seed, 1.0, args, data)
    if not info["cached"]:
        log(f"{kind} seed {seed}: trained the original ({info['seconds']:.0f}s)")
    teacher.eval()
    example, images = data.example(), data.calibration_images(seed)
    original = A.flops(teacher, example)
    out = {"original": A.top1(teacher, data.val_x, data.val_y), "flops": {"original": original},
           "test_images": len(data.val_y)}
    for name, budget_data in (("flops", None), ("measured", images)):
        start = time.perf_counter()
        csp = cspify.convert(teacher, example, target_flops=TARGET, search=SEARCH, data=budget_data, seed=seed,
                             kinds=A.PAPER_KINDS)
        out[f"{name}_seconds"] = time.perf_counter() - start
        out["flops"][name] = A.flops(csp, example)
        record = cspify.conversion_of(csp)
        out[f"{name}_choice"] = {s.name: f"{s.gamma:g}/{s.hidden}" for s in record.converted}
        calibrate(teacher, csp, images, max_images=A.CALIBRATION_IMAGES)
        out[f"{name}_calibrated"] = A.top1(csp, data.val_x, data.val_y)
        for loss in ("kd_logits", "kd_stages"):
            tuned = A.run_finetune(copy.deepcopy(csp), data, teacher, A.FINETUNE_ROWS[loss], seed)
            out[f"{name}_{loss}"] = A.top1(tuned, data.val_x, data.val_y)
        log(f"{kind} seed {seed} {name}: {out['flops'][name] / original:.3f}x flops in {out[f'{name}_seconds']:.0f}s, "
            f"calibrated {out[f'{name}_calibrated']:.2f}, +1 epoch {out[f'{name}_kd_logits']:.2f} / "
            f"{out[f'{name}_kd_stages']:.2f} {out[f'{name}_choice']}")
    pruned, ratio, cost = A.prune_to(teacher, data, out["flops"]["measured"])
    out["flops"]["pruned"], out["pruned_ratio"] = cost, ratio
    out["pruned_before"] = A.top1(pruned, data.val_x, data.val_y)
    tuned = A.run_finetune(A.as_finetunable(copy.deepcopy(pruned)), data, teacher, A.FINETUNE_ROWS["kd_logits"], seed)
    out["pruned_kd_logits"] = A.top1(tuned, data.val_x, data.val_y)
    log(f"{kind} seed {seed} pruned: {cost / original:.3f}x flops, {out['pruned_before']:.2f} -> "
        f"{out['pruned_kd_logits']:.2f}")
    return out


def note(results: dict, args, elapsed: float) -> str:
    lines = ["# Budgets at 0.7x flops: chosen by accuracy, by flops alone, and Torch-Pruning", "",
             f"`python benchmarks/budgets.py{' --quick' if args.quick else ''}` ({elapsed / 60:.1f} min, "
             f"{A.library_state()}). Fashion-MNIST, {args.train_subset or 60000} training images, "
             f"{next(iter(next(iter(results.values())).values()))['test_images']} test images; "
             f"the originals are those of accuracy.py --ablations (trained {args.epochs} epochs, cached). Top-1 %, mean ± std over the "
             "seeds. Each stage's options searched: gamma " + "/".join(f"{g:g}" for g in SEARCH.gammas)
             + ", hidden keep/scale. The pruned model gets at most the flops the accuracy-aware budget landed at.", ""]
    for kind, runs in results.items():
        seeds = sorted(runs)
        lines += [f"## {kind}", ""]
        fl = {k: statistics.mean(r["flops"][k] for r in runs.values()) for k in ("original", "flops", "measured",
                                                                                   "pruned")}
        lines += [f"flops: flops budget {fl['flops'] / fl['original']:.3f}x, accuracy-aware "
                  f"{fl['measured'] / fl['original']:.3f}x, pruned {fl['pruned'] / fl['original']:.3f}x; choosing took "
                  f"{statistics.mean(r['flops_seconds'] for r in runs.values()):.0f}s (flops) and "
                  f"{statistics.mean(r['measured_seconds'] for r in runs.values()):.0f}s (accuracy-aware); original "
                  f"{A.mean_std([r['original'] for r in runs.values()])}.", ""]
        lines += ["| row | top-1 % | seeds |", "|---|---|---|"]
        for key, label in ROWS:
            lines.append(f"| {label} | {A.mean_std([runs[s][key] for s in seeds])} | {len(seeds)} |")
        m = {key: statistics.mean(runs[s][key] for s in seeds) for key, _ in ROWS}
        lines += [""]
        for what, row in (("calibrated", "calibrated"), ("1 epoch, CE + logits", "kd_logits"),
                          ("1 epoch, the default", "kd_stages")):
            gap = m[f"measured_{row}"] - m[f"flops_{row}"]
            lines.append(f"- {'reached' if gap >= 0 else 'MISSED'}: accuracy-aware ≥ flops-only ({what}): "
                         f"{m[f'measured_{row}']:.2f} vs {m[f'flops_{row}']:.2f} ({A.diff(gap)})")
        gap = m["measured_kd_logits"] - m["pruned_kd_logits"]
        lines.append(f"- {'reached' if gap >= 0 else 'MISSED'}: accuracy-aware ≥ Torch-Pruning at the same flops, "
                     f"1 epoch, the same loss (CE + logits): {m['measured_kd_logits']:.2f} vs "
                     f"{m['pruned_kd_logits']:.2f} ({A.diff(gap)})")
        lines += ["", "choices (stage: gamma/hidden) per seed: " + "; ".join(
            f"seed {s}: flops {runs[s]['flops_choice']}, accuracy-aware {runs[s]['measured_choice']}" for s in seeds), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=A.DEFAULT_DATA)
    p.add_argument("--models", default="resnet,densenet,mobilenet", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--epochs", type=int, default=3, help="the originals' epochs (accuracy.py's cache key)")
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=str(A.ROOT / "BUDGETS.md"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_subset, args.seeds = 1, 1024, args.seeds[:1]
    start = time.perf_counter()
    if args.worker:  # one model, one thread, its results to a file
        torch.set_num_threads(1)
        data = A.open_benchmark_data(args.data, args.train_subset, 1000 if args.quick else None)
        log = lambda text: print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {text}", flush=True)
        runs = {seed: run_one(args.models[0], seed, args, data, log) for seed in args.seeds}
        Path(args.worker).write_text(json.dumps(runs))
        return
    A.CACHE.mkdir(parents=True, exist_ok=True)
    procs = {}
    for kind in args.models:
        result = A.CACHE / f"budgets-{kind}{'-quick' if args.quick else ''}.json"
        child = [sys.executable, __file__, "--models", kind, "--seeds", ",".join(map(str, args.seeds)),
                 "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--data", args.data,
                 "--worker", str(result)] + ["--quick"] * args.quick
        procs[kind] = (subprocess.Popen(child, stdout=open(A.CACHE / f"budgets-{kind}.log", "w"),
                                        stderr=subprocess.STDOUT), result)
        print(f"{kind}: log in {A.CACHE / f'budgets-{kind}.log'}", flush=True)
    results = {}
    for kind, (proc, result) in procs.items():
        if proc.wait() == 0 and result.exists():
            results[kind] = {int(s): r for s, r in json.loads(result.read_text()).items()}
        else:
            print(f"{kind} failed (exit {proc.returncode}): see its log", flush=True)
    if not results:
        sys.exit("budgets.py: no model finished")
    out = Path(args.out) if not args.quick else Path("/tmp/BUDGETS.quick.md")
    out.write_text(note(results, args, time.perf_counter() - start))
    print(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
