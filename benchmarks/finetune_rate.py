"""Does the comparison with Torch-Pruning depend on the fine-tune's learning rate?

accuracy.py fine-tunes the converted and the pruned model with one recipe, cspify.finetune's
defaults (lr 0.02). A calibrated conversion starts near its original (about 89% on
Fashion-MNIST) and a pruned model far from it (35-75%), so one rate may suit one start better
than the other. This script fine-tunes both, 1 epoch of CE + logit distillation, at several
rates, and reports each method at each rate and at its own best rate:

    python benchmarks/finetune_rate.py                  # ACCURACY-rate.md
    python benchmarks/finetune_rate.py --models resnet --seeds 0,1 --out /tmp/r.md   # 3 min

The originals are accuracy.py --ablations' (20,000 training images, 3 epochs, cached in
benchmarks/.cache); the converted model (gamma 0.5, the paper's stage kinds) is calibrated on
2,048 of the training images first; the pruned model is pruned to at most its flops, as
accuracy.py's row 9b.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cspify  # noqa: E402
from accuracy import (CALIBRATION_IMAGES, DEFAULT_DATA, FINETUNE_ROWS, GAMMA, ROOT, as_finetunable,  # noqa: E402
                      flops, mean_std, open_benchmark_data, prune_to, run_finetune, top1, trained)
from common import PAPER_KINDS  # noqa: E402
from cspify.calibrate import calibrate  # noqa: E402

TRAIN_IMAGES = 20000  # accuracy.py --ablations' originals, cached


def starts(kind: str, seed: int, args, data) -> tuple[torch.nn.Module, dict]:
    """The teacher and the two starting points: calibrated conversion and pruned model."""
    teacher, _ = trained(kind, "original", seed, 1.0, args, data)
    teacher.eval()
    example = data.example()
    csp = cspify.convert(teacher, example, gamma=GAMMA, seed=seed, kinds=PAPER_KINDS)
    calibrate(teacher, csp, data.calibration_images(seed), max_images=CALIBRATION_IMAGES, progress=False)
    pruned, _, _ = prune_to(teacher, data, flops(csp, example))
    return teacher, {"cspify": csp, "Torch-Pruning": as_finetunable(pruned)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--models", default="resnet,densenet,mobilenet", type=lambda s: s.split(","))
    p.add_argument("--seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rates", default="0.01,0.02,0.05", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--out", default=str(ROOT / "ACCURACY-rate.md"))
    args = p.parse_args()
    args.epochs, args.batch_size = 3, 128  # the cached originals' training
    torch.set_num_threads(2)
    data = open_benchmark_data(args.data, TRAIN_IMAGES, None)
    began = time.perf_counter()
    results = {}  # (kind, method, rate) -> [top-1 per seed]
    for kind in args.models:
        for seed in args.seeds:
            teacher, models = starts(kind, seed, args, data)
            for method, start in models.items():
                for rate in args.rates:
                    tuned = run_finetune(copy.deepcopy(start), data, teacher, FINETUNE_ROWS["kd_logits"], seed,
                                         lr=rate)
                    score = top1(tuned, data.val_x, data.val_y)
                    results.setdefault((kind, method, rate), []).append(score)
                    print(f"{kind} seed {seed} {method} lr {rate}: {score:.2f}", flush=True)
    write(Path(args.out), results, args, time.perf_counter() - began)


def write(path: Path, results: dict, args, seconds: float) -> None:
    methods = ("cspify", "Torch-Pruning")
    lines = ["# Fine-tune rate: cspify against Torch-Pruning at each learning rate", "",
             f"`python benchmarks/finetune_rate.py --models {','.join(args.models)} --seeds "
             f"{','.join(map(str, args.seeds))} --rates {','.join(map(str, args.rates))}` ({seconds / 60:.0f} min). "
             f"Fashion-MNIST, {TRAIN_IMAGES:,} training images, all 10,000 test images; the originals of "
             "accuracy.py --ablations; 1 epoch of `cspify.finetune`, CE + logit distillation, its defaults but "
             f"the rate. cspify: gamma {GAMMA:g}, calibrated on {CALIBRATION_IMAGES:,} images; Torch-Pruning: L1, "
             "uniform, at most the converted model's flops. Top-1 %, mean ± std over the seeds.", ""]
    for kind in args.models:
        lines += [f"## {kind}", "", "| lr | " + " | ".join(methods) + " | cspify minus pruning |", "|---|---|---|---|"]
        for rate in args.rates:
            got = [results[(kind, m, rate)] for m in methods]
            gap = statistics.mean(got[0]) - statistics.mean(got[1])
            lines.append(f"| {rate:g} | {mean_std(got[0])} | {mean_std(got[1])} | {gap:+.2f} |")
        best = {m: max(args.rates, key=lambda r: statistics.mean(results[(kind, m, r)])) for m in methods}
        means = {m: statistics.mean(results[(kind, m, best[m])]) for m in methods}
        lines += ["", f"Each at its best rate: cspify {means['cspify']:.2f} (lr {best['cspify']:g}), Torch-Pruning "
                      f"{means['Torch-Pruning']:.2f} (lr {best['Torch-Pruning']:g}): "
                      f"{means['cspify'] - means['Torch-Pruning']:+.2f}.", ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
