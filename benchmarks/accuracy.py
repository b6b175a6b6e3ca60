"""Does a converted model recover the original's accuracy? Fashion-MNIST, three small models,
several seeds; writes ACCURACY.md.

    python benchmarks/accuracy.py                       # all 60,000 images, rows 1-3, 5, 8, 9b, 5@3, 9b@3: 94 min on 2 shared cores, teachers included
    python benchmarks/accuracy.py --ablations           # every row on 20,000 images: 24 minutes alone on 2 cores
    python benchmarks/accuracy.py --quick               # a smoke run in about a minute (numbers meaningless)
    python benchmarks/accuracy.py --models resnet --seeds 0,1 --epochs 3 --train-subset 20000

Per model and seed, each row from the same trained original (the teacher):

    1  original, trained E epochs from scratch (cached in benchmarks/.cache/, so reruns skip it)
    2  converted at gamma 0.5, as is (cspify.convert's defaults: split last)
    3  calibrated: cspify.calibrate on 2,048 unlabeled training images, no gradient step
    4  calibrated + 1 epoch cspify.finetune, cross-entropy only
    5  calibrated + 1 epoch cspify.finetune, cross-entropy + logit distillation
    6  calibrated + 1 epoch cspify.finetune, its defaults (CE + logits + every stage's output)
    7  calibrated + 1 epoch cspify.finetune without labels (logits + stages)
    8  the original with every width scaled down to the converted model's flops, trained E
       epochs from scratch (cached too)
    9  Torch-Pruning (L1 magnitude, uniform channel pruning) of the original to the converted
       model's flops + 1 epoch cspify.finetune with cross-entropy only (and, row 9b, with
       logit distillation from the original, as row 5; --no-pruned-kd skips it)
    3s, 6s  rows 3 and 6 with split "importance" (the calibration images choose the channels
       that run through each stage), the same images and seed
    5@3, 9b@3  rows 5 and 9b with 3 epochs of fine-tuning (--long-rows, --long-epochs), from
       the same calibrated and pruned models, after every seed's 1-epoch rows

and row 6 again under ``torchrun --nproc_per_node 2`` (gloo, CPU) at the same global batch,
for the models and seeds that ``--ddp-models`` and ``--ddp-seeds`` name. The default run is
the comparison on every training image (rows 1-3, 5, 8, 9b and the 3-epoch rows: ACCURACY.md);
``--ablations`` runs every row on a 20,000-image subset, with the DDP rows
(ACCURACY-ablations.md). All fine-tunes run
cspify.finetune's defaults; only the loss switches differ from row to row. Accuracy is top-1
on the full 10k test set. Flops are fvcore's (one multiply-add is one flop), as in
``cspify.compare``. A row that fails writes its reason into the table; the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import cspify  # noqa: E402
from accuracy_models import MODELS, build  # noqa: E402
from common import PAPER_KINDS  # noqa: E402
from cspify.calibrate import calibrate  # noqa: E402
from cspify.data import DataError, open_data  # noqa: E402
from cspify.config import CSPConfig  # noqa: E402
from cspify.finetune import Recipe, finetune  # noqa: E402
from cspify.record import Conversion, attach  # noqa: E402
from cspify.measure import fvcore_counts  # noqa: E402

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
CACHE = HERE / ".cache"
RECIPE = "sgd-nesterov-0.1-cosine-wd5e-4-v1"  # the from-scratch recipe: part of the cache key
GAMMA = 0.5
CALIBRATION_IMAGES = 2048

ROWS = [
    ("original", "1. original, trained E epochs (the teacher)"),
    ("converted", "2. converted (gamma 0.5), as is"),
    ("calibrated", "3. calibrated (2,048 unlabeled images, no gradient)"),
    ("ft_ce", "4. calibrated + 1 epoch fine-tune, cross-entropy only"),
    ("kd_logits", "5. calibrated + 1 epoch distillation: CE + logits"),
    ("kd_stages", "6. calibrated + 1 epoch distillation: CE + logits + stages (the defaults)"),
    ("kd_nolabels", "7. calibrated + 1 epoch distillation without labels: logits + stages"),
    ("narrow", "8. baseline: original at the same flops (widths scaled), E epochs from scratch"),
    ("pruned", "9. baseline: Torch-Pruning to the same flops + 1 epoch fine-tune, CE only"),
    ("pruned_kd", "9b. Torch-Pruning to the same flops + 1 epoch, CE + logit distillation"),
    ("split_calibrated", "3s. row 3 with split importance (the images choose the channels that run through)"),
    ("split_kd_stages", "6s. row 6 with split importance"),
    ("ddp", "6 under torchrun, 2 processes (gloo), same global batch"),
]
LABELS = dict(ROWS)

# The two runs: the comparison on every training image (ACCURACY.md) and the ablations of the
# losses, the split and the processes on a 20,000-image subset (ACCURACY-ablations.md).
FULL_ROWS = ["original", "converted", "calibrated", "kd_logits", "narrow", "pruned_kd"]
FULL = dict(train_subset=0, rows=FULL_ROWS, long_epochs=3, ddp_models=[], note="ACCURACY.md")
ABLATIONS = dict(train_subset=20000, rows=[n for n, _ in ROWS if n != "ddp"], long_epochs=0, ddp_models=["resnet"],
                 note="ACCURACY-ablations.md")


def names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]

# "batch and processes": row 6 at each (processes, batch per process), with the default recipe
# and with the earlier one, whose rate grew with the global batch (0.02 per 128, 3% warm-up).
BATCH_CASES = [(1, 128), (1, 512), (2, 128), (2, 512)]
RECIPES = {"default": Recipe(), "linear": Recipe(lr_scaling="linear", warmup=0.03)}
RECIPE_LABELS = {"default": "the default (lr 0.02 at any batch, 10% warm-up)",
                 "linear": "the earlier default (lr 0.02 x global batch / 128, 3% warm-up)"}

# Loss switches per row; everything else is cspify.finetune's defaults.
FINETUNE_ROWS = {
    "ft_ce": dict(teacher=False, kd_weight=0.0, feature_weight=0.0),
    "kd_logits": dict(teacher=True, feature_weight=0.0),
    "kd_stages": dict(teacher=True),
    "kd_nolabels": dict(teacher=True, use_labels=False),
}


# ---------------------------------------------------------------- data


class Data:
    """The training subset and the test set as normalised tensors, plus what ImageData knows."""

    def __init__(self, path: str, train_subset: int, test_subset: int | None = None) -> None:
        data = open_data(path, mean="data")  # the statistics the cached teachers were trained on
        self.image_data = data
        self.num_classes, self.channels, self.size = data.num_classes, data.channels, tuple(data.size)
        total = len(data.train)
        n = min(train_subset, total) if train_subset else total
        order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
        self.train_indices = order[:n].sort().values
        self.train_x, self.train_y = data.train.batch(self.train_indices)
        val_n = min(test_subset, len(data.val)) if test_subset else len(data.val)
        self.val_x, self.val_y = data.val.batch(torch.arange(val_n))
        self.train_total, self.val_total = total, len(data.val)
        digest = hashlib.sha1()
        digest.update(data.train.images[self.train_indices].numpy().tobytes())
        digest.update(data.train.labels[self.train_indices].numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:12]

    def train_set(self) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(self.train_x, self.train_y)

    def calibration_images(self, seed: int, count: int = CALIBRATION_IMAGES) -> torch.Tensor:
        pick = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(1000 + seed))[:count]
        return self.train_x[pick]

    def example(self) -> torch.Tensor:
        return self.train_x[:1]


def open_benchmark_data(path: str, train_subset: int, test_subset: int | None) -> Data:
    if not Path(path).is_dir():
        sys.exit(f"accuracy.py: no Fashion-MNIST at {path}: install it with `apt-get install dataset-fashion-mnist` "
                 "(the four IDX files land in /usr/share/datasets/fashion-mnist/) or pass --data DIR.")
    try:
        return Data(path, train_subset, test_subset)
    except DataError as exc:
        sys.exit(f"accuracy.py: {exc}")


# ---------------------------------------------------------------- training and measuring


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / len(x)


def train_scratch(model: nn.Module, data: Data, epochs: int, batch_size: int, seed: int) -> nn.Module:
    """The from-scratch recipe of the original and the narrow baseline: SGD (Nesterov, momentum
    0.9, weight decay 5e-4), lr 0.1 x batch/128, 3% linear warm-up then cosine to zero."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.train_x) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(0.03 * total))
    base_lr = 0.1 * batch_size / 128
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    plain = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": plain, "weight_decay": 0.0}],
                          lr=base_lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_x), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    return model


def flops(model: nn.Module, example: torch.Tensor) -> int:
    """fvcore flops of one image, counted as cspify.compare counts them."""
    was = model.training
    model.eval()
    try:
        return int(fvcore_counts(model, (example[:1],))[0][""])
    finally:
        model.train(was)


def narrow_width(kind: str, data: Data, target: int) -> tuple[float, int]:
    """The largest width multiplier whose model has at most ``target`` flops (bisection)."""
    def cost(w):
        return flops(build(kind, channels=data.channels, num_classes=data.num_classes, width=w), data.example())

    low, high = 0.05, 1.0
    for _ in range(20):
        mid = (low + high) / 2
        if cost(mid) <= target:
            low = mid
        else:
            high = mid
    return low, cost(low)


def removed_channels(original: nn.Module, pruned: nn.Module) -> float:
    """The share of the convs' output channels that pruning removed. Torch-Pruning keeps
    ``int(n * (1 - ratio))`` of a group's ``n`` channels, so any ratio above 0 removes at least
    one channel of every group: on a dense stage of growth rate 8 a nominal ratio of 0.001
    removes 1 of 8 (12.5%). This, not the nominal ratio, is what the baseline pruned."""
    def widths(m):
        return [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    before, after = sum(widths(original)), sum(widths(pruned))
    return 1.0 - after / before


def prune_to(model: nn.Module, data: Data, target: int) -> tuple[nn.Module, float, int]:
    """Torch-Pruning of ``model``: L1 magnitude importance, uniform channel pruning (its default,
    not global), the classifier kept whole; the smallest ratio with at most ``target`` flops
    (``removed_channels`` says what that ratio removed)."""
    import torch_pruning as tp

    example = data.example()

    def pruned(ratio):
        m = copy.deepcopy(model).eval()
        classifier = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[classifier], global_pruning=False)
        pruner.step()
        return m

    low, high = 0.0, 0.95
    best = None
    for _ in range(12):
        mid = (low + high) / 2
        m = pruned(mid)
        cost = flops(m, example)
        if cost <= target:
            high, best = mid, (m, cost)
        else:
            low = mid
    if best is None:
        m = pruned(high)
        best = (m, flops(m, example))
    return best[0], high, best[1]


# ---------------------------------------------------------------- cache


def cache_path(model: nn.Module, kind: str, what: str, seed: int, epochs: int, batch_size: int, data: Data) -> Path:
    """Keyed by model (its architecture, widths included), seed, E, batch, the data subset and the recipe."""
    arch = hashlib.sha1(repr(model).encode()).hexdigest()[:8]
    key = f"{kind}-{what}-{arch}-seed{seed}-e{epochs}-b{batch_size}-n{len(data.train_x)}-{data.fingerprint}-{RECIPE}"
    return CACHE / f"{key}.pt"


def trained(kind: str, what: str, seed: int, width: float, args, data: Data) -> tuple[nn.Module, dict]:
    """A model trained from scratch (``what`` is "original" or "narrow"), from the cache when there."""
    model = build(kind, channels=data.channels, num_classes=data.num_classes, width=width)
    path = cache_path(model, kind, what, seed, args.epochs, args.batch_size, data)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.eval()
        return model, {"seconds": saved["seconds"], "cached": True}
    torch.manual_seed(seed)
    model = build(kind, channels=data.channels, num_classes=data.num_classes, width=width)
    start = time.perf_counter()
    train_scratch(model, data, args.epochs, args.batch_size, seed)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "seconds": seconds, "width": width}, tmp)
    os.replace(tmp, path)
    return model, {"seconds": seconds, "cached": False}


# ---------------------------------------------------------------- one model, one seed


def run_finetune(model: nn.Module, data: Data, teacher: nn.Module | None, switches: dict, seed: int,
                 batch_size: int = 128, recipe: Recipe = Recipe(), epochs: int = 1, lr: float | None = None) -> nn.Module:
    """cspify.finetune for ``epochs`` (1: rows 4-7 and 9) with its defaults; only the loss
    switches change (and the seed of the data order, and ``batch_size`` per process under DDP:
    128 // processes; ``lr`` where finetune_rate.py tries another rate)."""
    kwargs = {k: v for k, v in switches.items() if k != "teacher"}
    torch.manual_seed(seed)
    return finetune(model, data.train_set(), teacher=teacher if switches.get("teacher") else None, epochs=epochs,
                    batch_size=batch_size, seed=seed, progress=False, recipe=recipe, lr=lr, **kwargs)


def as_finetunable(model: nn.Module) -> nn.Module:
    """A plain model (the pruned baseline) with an empty conversion record attached, so that
    cspify.finetune, which trains only models cspify made, runs on it with the very same recipe
    (no stage to distil: cross-entropy, and logit distillation where a teacher is given)."""
    if not hasattr(model, "meta"):
        model.meta = {}
    attach(model, Conversion(config=CSPConfig(), stages=()))
    return model


def run_one(kind: str, seed: int, args, data: Data, log, state: dict) -> dict:
    """The 1-epoch rows of ``args.rows`` for one model and seed: {row: {top1, seconds, note} or
    {error}}. ``state`` keeps the teacher, the calibrated and the pruned models for the long
    rows (``run_long``)."""
    rows, figures = {}, {}
    example = data.example()
    wanted = set(args.rows)
    row = row_runner(kind, seed, args, rows, log)

    def original():
        model, info = trained(kind, "original", seed, 1.0, args, data)
        state["teacher"] = model.eval()
        figures["original"] = flops(model, example)
        return {"top1": top1(model, data.val_x, data.val_y), "seconds": info["seconds"],
                "note": "cached" if info["cached"] else ""}

    row("original", original)
    if "teacher" not in state:
        return {"rows": rows, "flops": figures}
    teacher = state["teacher"]

    def converted():
        csp = cspify.convert(teacher, example, gamma=GAMMA, seed=seed, kinds=PAPER_KINDS)
        state["converted"] = csp
        figures["converted"] = flops(csp, example)
        record = cspify.conversion_of(csp)
        figures["stages"] = f"{len(record.converted)} of {len(record.stages)}"
        return {"top1": top1(csp, data.val_x, data.val_y)}

    row("converted", converted)

    def calibrated(split=None):
        csp = copy.deepcopy(state["converted"]) if split is None else cspify.convert(
            teacher, example, gamma=GAMMA, seed=seed, kinds=PAPER_KINDS, split=split, data=data.calibration_images(seed))
        start = time.perf_counter()
        calibrate(teacher, csp, data.calibration_images(seed), max_images=CALIBRATION_IMAGES)
        seconds = time.perf_counter() - start
        state["calibrated" if split is None else "calibrated_split"] = csp
        return {"top1": top1(csp, data.val_x, data.val_y), "seconds": seconds}

    if "converted" in state:
        row("calibrated", calibrated)
        if wanted & {"split_calibrated", "split_kd_stages"}:
            row("split_calibrated", lambda: calibrated("importance"))

    def split_tuned():
        if "calibrated_split" not in state:
            raise RuntimeError("no calibrated model with split importance")
        start = time.perf_counter()
        model = run_finetune(copy.deepcopy(state["calibrated_split"]), data, teacher, FINETUNE_ROWS["kd_stages"], seed)
        return {"top1": top1(model, data.val_x, data.val_y), "seconds": time.perf_counter() - start}

    row("split_kd_stages", split_tuned)
    for name, switches in FINETUNE_ROWS.items():
        if "calibrated" in state:
            row(name, lambda switches=switches: tuned_row(state["calibrated"], data, teacher, switches, seed))

    target = figures.get("converted")

    def narrow():
        if target is None:
            raise RuntimeError("no converted model to match the flops of")
        width, cost = narrow_width(kind, data, target)
        figures["narrow"], figures["narrow_width"] = cost, round(width, 3)
        model, info = trained(kind, "narrow", seed, width, args, data)
        return {"top1": top1(model, data.val_x, data.val_y), "seconds": info["seconds"],
                "note": f"width x{width:.3f}" + (", cached" if info["cached"] else "")}

    row("narrow", narrow)

    def prune():
        if target is None:
            raise RuntimeError("no converted model to match the flops of")
        start = time.perf_counter()
        model, ratio, cost = prune_to(teacher, data, target)
        state["prune_seconds"] = time.perf_counter() - start
        figures["pruned"], figures["pruned_ratio"] = cost, round(ratio, 3)
        figures["pruned_removed"] = round(removed_channels(teacher, model), 3)
        state["pruned"] = model
        state["pruned_top1"] = top1(model, data.val_x, data.val_y)
        state["pruned_note"] = (f"ratio {ratio:.3f} ({figures['pruned_removed']:.1%} of conv channels removed), "
                                f"pruning {state['prune_seconds']:.0f}s")

    def pruned(switches):
        if "pruned" not in state:
            prune()
        out = tuned_row(as_finetunable(state["pruned"]), data, teacher, switches, seed)
        out["seconds"] += state["prune_seconds"]
        return out | {"before": state["pruned_top1"], "note": state["pruned_note"]}

    row("pruned", lambda: pruned(FINETUNE_ROWS["ft_ce"]))
    if args.pruned_kd:
        row("pruned_kd", lambda: pruned(FINETUNE_ROWS["kd_logits"]))
    return {"rows": rows, "flops": figures}


def run_long(kind: str, seed: int, args, data: Data, log, state: dict, into: dict) -> None:
    """The long rows (``--long-rows``, each ``--long-epochs`` epochs) for one model and seed,
    from the calibrated and the pruned models ``run_one`` left in ``state``; added to ``into``."""
    row = row_runner(kind, seed, args, into["rows"], log, long=True)
    teacher = state.get("teacher")
    epochs = args.long_epochs
    starts = {"kd_logits": ("calibrated", "kd_logits"), "kd_stages": ("calibrated", "kd_stages"),
              "pruned_kd": ("pruned", "kd_logits"), "pruned": ("pruned", "ft_ce")}
    for name in args.long_rows:
        start, switches = starts[name]

        def tuned(start=start, switches=switches):
            if start not in state:
                raise RuntimeError(f"no {start} model")
            model = as_finetunable(state[start]) if start == "pruned" else state[start]
            return tuned_row(model, data, teacher, FINETUNE_ROWS[switches], seed, epochs)

        row(long_name(name, epochs), tuned)


def row_runner(kind: str, seed: int, args, rows: dict, log, long: bool = False):
    """``row(name, fn)``: runs ``fn`` when ``args.rows`` asks for ``name`` (or, ``long``, always)
    and stores its result, or its error: a failed row writes its reason and the run goes on."""
    def row(name, fn):
        if not long and name not in args.rows:
            return
        start = time.perf_counter()
        try:
            out = fn() or {}
            out.setdefault("seconds", time.perf_counter() - start)
            rows[name] = out
            log(f"{kind} seed {seed} {name}: {out.get('top1', float('nan')):.2f}% in {out['seconds']:.0f}s "
                f"{out.get('note', '')}")
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
                          "seconds": time.perf_counter() - start}
            log(f"{kind} seed {seed} {name} FAILED: {rows[name]['error']}")
            if args.debug:
                traceback.print_exc()

    return row


def tuned_row(start: nn.Module, data: Data, teacher: nn.Module, switches: dict, seed: int, epochs: int = 1) -> dict:
    """A fine-tune row: a copy of ``start`` fine-tuned, its top-1 and the fine-tune's seconds."""
    model = copy.deepcopy(start)
    began = time.perf_counter()
    model = run_finetune(model, data, teacher, switches, seed, epochs=epochs)
    return {"top1": top1(model, data.val_x, data.val_y), "seconds": time.perf_counter() - began}


def long_name(row: str, epochs: int) -> str:
    return f"{row}@{epochs}"


def all_rows(args) -> list[tuple[str, str]]:
    """(name, label) of every row the note may show: ROWS, then the long rows."""
    epochs = getattr(args, "long_epochs", 0)
    long = [(long_name(name, epochs), LABELS[name].replace(". ", f"@{epochs}. ", 1).replace("1 epoch", f"{epochs} epochs"))
            for name in getattr(args, "long_rows", ()) if epochs]
    return ROWS + long


# ---------------------------------------------------------------- DDP


def run_ddp(kind: str, seed: int, args, log, processes: int = 2, extra: list[str] = (), out: Path | None = None,
            name: str = "ddp") -> dict:
    """Row 6 under torchrun with ``processes`` processes; the teacher comes from the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or Path(tmp) / "ddp.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
                   str(Path(__file__).resolve()), "--ddp-worker", "--models", kind, "--seeds", str(seed),
                   "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--data", args.data,
                   "--ddp-result", str(out), *extra]
        if args.test_subset:
            command += ["--test-subset", str(args.test_subset)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            lines = (proc.stderr + proc.stdout).splitlines()
            errors = [line.split(":", 1)[1].strip() for line in lines
                      if line.startswith("[rank0]:") and ("Error" in line or "Exit" in line)]
            error = f"torchrun exited {proc.returncode}: " + (errors[-1] if errors else " / ".join(lines[-3:]))
            error = error[:300]
            log(f"{kind} seed {seed} {name} FAILED: {error}")
            return {"error": error, "seconds": seconds}
        result = json.loads(out.read_text())
        result["seconds"] = result.get("seconds", seconds)
        result["note"] = f"{seconds:.0f}s with start-up"
        log(f"{kind} seed {seed} {name}: {result['top1']:.2f}% in {result['seconds']:.0f}s")
        return result


def ddp_worker(args) -> None:
    """One rank of the DDP row. Rank 0 converts and calibrates (DDP hands its weights and
    buffers to the other ranks when it wraps the model); all ranks fine-tune as row 6 at the
    same global batch (128 // processes each). Then rank 0 runs the same fine-tune in one
    process from the same calibrated model: the reference the DDP result is compared with,
    made by the same library code (the 1-process rows may have run before a library change)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kind, seed = args.models[0], args.seeds[0]
    data = Data(args.data, args.train_subset, args.test_subset)
    teacher, info = trained(kind, "original", seed, 1.0, args, data)
    if not info["cached"]:
        raise SystemExit("the DDP row needs the cached original: run the 1-process rows first")
    csp = cspify.convert(teacher, data.example(), gamma=GAMMA, seed=seed, kinds=PAPER_KINDS)
    reference = None
    if args.ddp_start:  # a batch case: every rank starts from the calibrated weights given
        csp.load_state_dict(torch.load(args.ddp_start, weights_only=True))
    elif rank == 0:
        calibrate(teacher, csp, data.calibration_images(seed), max_images=CALIBRATION_IMAGES)
        reference = copy.deepcopy(csp)
    dist.barrier()
    start = time.perf_counter()
    batch = args.ddp_batch or 128 // world
    csp = run_finetune(csp, data, teacher, FINETUNE_ROWS["kd_stages"], seed, batch_size=batch,
                       recipe=RECIPES[args.ddp_recipe])
    seconds = time.perf_counter() - start
    result = {"top1": top1(csp, data.val_x, data.val_y), "seconds": seconds, "world_size": world,
              "lr": csp.meta["cspify.finetune"].recipe["lr"]} if rank == 0 else None
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and args.ddp_start:
        Path(args.ddp_result).write_text(json.dumps(result))
    elif rank == 0:
        os.environ["WORLD_SIZE"] = "1"  # the reference runs alone: finetune must not join a process group
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        reference = run_finetune(reference, data, teacher, FINETUNE_ROWS["kd_stages"], seed, batch_size=128)
        result["reference_seconds"] = time.perf_counter() - start
        result["reference_top1"] = top1(reference, data.val_x, data.val_y)
        Path(args.ddp_result).write_text(json.dumps(result))


def run_batches(kind: str, seed: int, args, data: Data, log) -> dict:
    """Row 6 at each of BATCH_CASES under both RECIPES, each under torchrun from the same
    calibrated model (made once here, loaded by every rank): {"2x512-linear": {top1, lr, seconds}}."""
    teacher, info = trained(kind, "original", seed, 1.0, args, data)
    csp = cspify.convert(teacher, data.example(), gamma=GAMMA, seed=seed, kinds=PAPER_KINDS)
    calibrate(teacher, csp, data.calibration_images(seed), max_images=CALIBRATION_IMAGES)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "calibrated.pt"
        torch.save(csp.state_dict(), start)
        for processes, batch in BATCH_CASES:
            for recipe in RECIPES:
                name = f"{processes}x{batch}-{recipe}"
                out = Path(tmp) / f"{name}.json"
                extra = ["--ddp-start", str(start), "--ddp-batch", str(batch), "--ddp-recipe", recipe]
                results[name] = run_ddp(kind, seed, args, log, processes=processes, extra=extra, out=out, name=name)
    return results


# ---------------------------------------------------------------- the note


def batch_table(runs: dict) -> list[str]:
    """The "batch and processes" table of one model: row 6 per case and recipe, over the seeds run."""
    cases = {seed: r["batches"] for seed, r in runs.items() if "batches" in r}
    if not cases:
        return []
    lines = ["### Batch and processes", "",
             f"Row 6 (calibrated + 1 epoch, the default losses) under `torchrun --nproc_per_node P` (gloo), batch B "
             f"per process, from the same calibrated model; seeds {', '.join(map(str, cases))}; top-1 % (the rate "
             "the run used):", "",
             "| processes | batch per process | global batch | " + " | ".join(RECIPE_LABELS[r] for r in RECIPES) + " |",
             "|---|---|---|" + "---|" * len(RECIPES)]
    for processes, batch in BATCH_CASES:
        cells = []
        for recipe in RECIPES:
            found = [c[f"{processes}x{batch}-{recipe}"] for c in cases.values() if f"{processes}x{batch}-{recipe}" in c]
            values = [f["top1"] for f in found if "top1" in f]
            errors = [f["error"] for f in found if "error" in f]
            rates = sorted({f["lr"] for f in found if "lr" in f})
            cell = mean_std(values) + (f" (lr {', '.join(f'{r:.3g}' for r in rates)})" if rates else "")
            cells.append("; ".join([cell] * bool(values) + errors) or "-")
        lines.append(f"| {processes} | {batch} | {processes * batch} | " + " | ".join(cells) + " |")
    return lines + [""]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def human(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def row_values(results: dict, kind: str, name: str) -> list[float]:
    return [r["rows"][name]["top1"] for r in results.get(kind, {}).values()
            if name in r.get("rows", {}) and "top1" in r["rows"][name]]


def mean_of(results, kind, name) -> float | None:
    values = row_values(results, kind, name)
    return statistics.mean(values) if values else None


def diff(value: float) -> str:
    """A signed difference; three decimals where two would print a tie as -0.00 or +0.00."""
    return f"{value:+.2f}" if round(value, 2) != 0 else f"{value:+.3f}"


def targets(results: dict, ddp: dict, kind: str, args) -> list[str]:
    """The issues' targets for one model: reached / missed, with the numbers, for the rows run."""
    rows = all_rows(args)
    m = {name: mean_of(results, kind, name) for name, _ in rows}
    number = {name: label.split(" ", 1)[0].rstrip(".") for name, label in rows}
    lines = []

    def check(text, ok):
        lines.append(f"- {'reached' if ok else 'MISSED'}: {text}")

    def compare(row, base, what, goal):
        if m.get(row) is not None and m.get(base) is not None:
            check(f"row {number[row]} ≥ {what} (row {number[base]}, {goal}): {m[row]:.2f} vs {m[base]:.2f} "
                  f"({diff(m[row] - m[base])})", m[row] >= m[base])

    orig = m["original"]
    if orig is not None and m["calibrated"] is not None:
        ratio = m["calibrated"] / orig
        check(f"calibrated ≥ 97% of the original's top-1 (issue 21; 90% in issue 10): {m['calibrated']:.2f} / "
              f"{orig:.2f} = {100 * ratio:.1f}%", ratio >= 0.97)
    epoch_row = next((n for n in ("kd_stages", "kd_logits") if m.get(n) is not None), None)
    if epoch_row and m["calibrated"] is not None:
        seconds = {name: [r["rows"][name]["seconds"] for r in results[kind].values()
                          if "top1" in r["rows"].get(name, {})] for name in ("calibrated", epoch_row)}
        calib, epoch = statistics.mean(seconds["calibrated"]), statistics.mean(seconds[epoch_row])
        check(f"calibration ≤ 0.25x one fine-tune epoch (issue 21; rows 3 and {number[epoch_row]}, same process and "
              f"machine): {calib:.1f}s vs {epoch:.1f}s = {calib / epoch:.2f}x", calib / epoch <= 0.25)
    if orig is not None and epoch_row:
        gap = orig - m[epoch_row]
        check(f"1 epoch of distillation (row {number[epoch_row]}) within 1.0 point of the original: "
              f"{m[epoch_row]:.2f} vs {orig:.2f} ({diff(-gap)})", gap <= 1.0)
    budgets = [("", 1)] + [(f"@{args.long_epochs}", args.long_epochs)] * bool(args.long_epochs)
    for suffix, epochs in budgets:
        budget = f"{epochs} epoch{'s' * (epochs > 1)} after E"
        for row in ("kd_stages", "kd_logits"):
            compare(row + suffix, "narrow", "the same-flops narrow model trained E epochs", budget)
        compare("kd_stages" + suffix, "pruned" + suffix, "Torch-Pruning at the same flops", f"{budget}, CE only")
        compare("kd_logits" + suffix, "pruned_kd" + suffix, "Torch-Pruning at the same flops and loss",
                f"{budget}, CE + logits for both")
    for row_, other, what in (("calibrated", "split_calibrated", "calibrated"), ("kd_stages", "split_kd_stages", "row 6")):
        if m[row_] is not None and m[other] is not None:
            check(f"the split by importance ≥ the last channels ({what}, rows {number[other]} and "
                  f"{number[row_]}): {m[other]:.2f} vs {m[row_]:.2f} ({diff(m[other] - m[row_])})",
                  m[other] >= m[row_])
    if m["kd_stages"] is not None and m["kd_nolabels"] is not None:
        gap = m["kd_stages"] - m["kd_nolabels"]
        check(f"labels withheld (row 7) within 2 points of the labelled result (row 6): {m['kd_nolabels']:.2f} vs "
              f"{m['kd_stages']:.2f} ({diff(-gap)})", gap <= 2.0)
    runs = ddp.get(kind, {})
    if runs:
        # The reference: the same fine-tune in 1 process from the same calibrated model, run by
        # the DDP job itself (same library code); row 6 where an older job did not run one.
        pairs = [(s, r["top1"], r.get("reference_top1", results[kind].get(s, {}).get("rows", {})
                                      .get("kd_stages", {}).get("top1")))
                 for s, r in runs.items() if "top1" in r]
        pairs = [p for p in pairs if p[2] is not None]
        if pairs:
            diffs = [a - b for _, a, b in pairs]
            mean_diff = statistics.mean(diffs)
            worst = max(abs(d) for d in diffs)
            detail = ", ".join(f"seed {s}: {a:.2f} vs {b:.2f}" for s, a, b in pairs)
            check(f"2 processes agree with 1 process within ±0.3 on the mean over seeds: {mean_diff:+.2f} "
                  f"({detail}; largest single-seed difference {worst:.2f})", abs(mean_diff) <= 0.3)
        else:
            lines.append("- not measured: 2 processes vs 1 (" + "; ".join(
                f"seed {s}: {r.get('error', 'no result')}" for s, r in runs.items()) + ")")
    return lines


def cached_note(results: dict) -> str:
    """What the cache saved this run: the training time of the models it read instead."""
    per_model = {kind: [row["seconds"] for r in runs.values() for name in ("original", "narrow")
                        for row in [r["rows"].get(name, {})] if "cached" in row.get("note", "")]
                 for kind, runs in results.items()}
    count = sum(len(v) for v in per_model.values())
    if not count:
        return ""
    return (f"; {count} originals and narrow baselines came from the cache (marked \"cached\"): training them had "
            f"taken {sum(map(sum, per_model.values())) / 60:.1f} min in all, "
            f"{max(map(sum, per_model.values())) / 60:.1f} min for the model that took longest, which a run from "
            "an empty cache adds")


def write_note(path: Path, results: dict, ddp: dict, args, data: Data, elapsed: float, done: bool) -> None:
    lines = ["# Accuracy: does a converted model recover the original's?", ""]
    if args.quick:
        lines += ["**Smoke run (`--quick`): tiny data, one epoch; the numbers mean nothing.**", ""]
    if not done:
        lines += [f"**Run in progress ({elapsed / 60:.0f} min so far): the table holds what has finished.**", ""]
    lines += [
        "Written by `benchmarks/accuracy.py`; rerun with:", "", "```bash", args.command, "```", "",
        f"- machine: {os.cpu_count()} CPU cores shared with other jobs, "
        + ("one process per model side by side, each with `torch.set_num_threads(1)`, "
           if getattr(args, "parallel", False) else f"`torch.set_num_threads({args.threads})`, ")
        + f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}; "
        f"whole run {elapsed / 60:.1f} min wall time"
        + cached_note(results),
        f"- data: Fashion-MNIST (`{args.data}`, {data.channels}x{data.size[0]}x{data.size[1]}, {data.num_classes} classes); "
        f"training on {len(data.train_x):,} of the {data.train_total:,} training images (a fixed random subset); "
        f"accuracy is top-1 on {len(data.val_x):,} of the {data.val_total:,} test images; calibration reads "
        f"{min(CALIBRATION_IMAGES, len(data.train_x)):,} of the training images without their labels",
        f"- E = {args.epochs} epochs for the original (row 1) and the narrow baseline (row 8), batch {args.batch_size}, "
        "SGD with Nesterov momentum 0.9, lr 0.1, 3% warm-up then cosine, weight decay 5e-4, no augmentation",
        f"- seeds: {', '.join(map(str, args.seeds))} (model init, data order, conversion, calibration sample); "
        "mean ± sample standard deviation over seeds; time is the mean wall time of one seed's row",
        "- rows 4-7 start from the calibrated model (row 3) and run `cspify.finetune` for 1 epoch with its untuned "
        "defaults; only the loss switches differ: row 4 `teacher=None, kd_weight=0, feature_weight=0`, "
        "row 5 `teacher=original, feature_weight=0`, row 6 `teacher=original`, row 7 `teacher=original, use_labels=False`",
        "- row 9: Torch-Pruning's `MetaPruner`, L1 magnitude importance, uniform (not global) channel pruning, "
        "the classifier kept, ratio bisected to the smallest with at most the converted model's flops; then "
        "`cspify.finetune` for 1 epoch as row 4 (CE only; an empty conversion record is attached to the pruned model, "
        "since `finetune` trains only models cspify made)"
        + ("; row 9b as row 5 (CE + logit distillation from the original)" if args.pruned_kd else ""),
        "- row 8: the largest width multiplier (bisected) whose model has at most the converted model's flops",
    ] + ([
        f"- rows marked @{args.long_epochs}: the same rows with {args.long_epochs} epochs of fine-tuning instead of 1 "
        f"(the same recipe, its cosine schedule spread over {args.long_epochs} epochs), from the same calibrated and "
        f"pruned models; seeds {', '.join(map(str, args.long_seeds))}, run after every seed's 1-epoch rows"]
        if args.long_epochs and args.long_rows else []) + [
        "- rows not listed were not run: `python benchmarks/accuracy.py --ablations` runs every row on 20,000 images "
        "(ACCURACY-ablations.md)" if not args.ablations else
        "- the comparison on all 60,000 training images at 1 and 3 epochs is `python benchmarks/accuracy.py` "
        "(ACCURACY.md)",
        "- flops: fvcore (one multiply-add is one flop) for one image, as `cspify.compare` counts them",
        f"- cspify: {getattr(args, 'library', 'not recorded')}",
        "",
    ]
    for kind in args.models:
        if kind not in results:
            continue
        runs = results[kind]
        seeds = len(runs)
        fl = next(iter(runs.values()))["flops"]
        lines += [f"## {kind}", ""]
        o = fl.get("original")
        parts = []
        for key, label in (("original", "original"), ("converted", "converted"), ("narrow", "narrow"),
                           ("pruned", "pruned")):
            values = [r["flops"][key] for r in runs.values() if key in r["flops"]]
            if values:
                value = statistics.mean(values)
                share = f" ({value / o:.2f}x)" if o and key != "original" else ""
                parts.append(f"{label} {human(value)}{share}")
        extra = []
        if "stages" in fl:
            extra.append(f"{fl['stages']} stages converted")
        if "narrow_width" in fl:
            extra.append(f"narrow width x{fl['narrow_width']}")
        ratios = [r["flops"]["pruned_ratio"] for r in runs.values() if "pruned_ratio" in r["flops"]]
        if ratios:
            removed = [r["flops"]["pruned_removed"] for r in runs.values() if "pruned_removed" in r["flops"]]
            extra.append(f"pruning ratio {min(ratios):.3g}" + (f"-{max(ratios):.3g}" if max(ratios) != min(ratios) else "")
                         + (f", which removed {statistics.mean(removed):.1%} of the conv channels" if removed else ""))
            if removed and min(ratios) < 0.01 < statistics.mean(removed):
                extra.append("Torch-Pruning keeps int(n x (1 - ratio)) of a group's n channels, so any ratio above 0 "
                             "removes at least one channel per group: its flops cannot come closer to the converted "
                             "model's than this")
        lines += [f"flops per image: {', '.join(parts)}" + (f"; {', '.join(extra)}" if extra else "") + ".", ""]
        lines += ["| row | top-1 % | vs original | time (s) | seeds | notes |", "|---|---|---|---|---|---|"]
        orig = mean_of(results, kind, "original")
        for name, label in all_rows(args):
            if name == "ddp":
                runs_ddp = {seed: r for seed, r in ddp.get(kind, {}).items() if "seconds" in r}
                if not runs_ddp:
                    continue
                values = [r["top1"] for r in runs_ddp.values() if "top1" in r]
                errors = [f"seed {s}: {r['error']}" for s, r in runs_ddp.items() if "error" in r]
                times = [r["seconds"] for r in runs_ddp.values()]
                refs = [r["reference_top1"] for r in runs_ddp.values() if "reference_top1" in r]
                notes = "; ".join(errors) or "seeds " + ", ".join(map(str, runs_ddp))
                if refs:
                    notes += (f"; the same job's 1-process reference (same code, same calibrated start): "
                              f"{mean_std(refs)}")
            else:
                present = [r["rows"][name] for r in runs.values() if name in r["rows"]]
                if not present:
                    continue
                values = [p["top1"] for p in present if "top1" in p]
                errors = sorted({p["error"] for p in present if "error" in p})
                times = [p["seconds"] for p in present]
                notes = sorted({p["note"] for p in present if p.get("note")}) + errors
                before = [p["before"] for p in present if "before" in p]
                if before:
                    notes = [f"{mean_std(before)} before fine-tuning"] + [n for n in notes if not n.startswith("ratio")]
                notes = "; ".join(notes)
            delta = f"{statistics.mean(values) - orig:+.2f}" if values and orig is not None and name != "original" else ""
            lines.append(f"| {label} | {mean_std(values)} | {delta} | {statistics.mean(times):.0f} | "
                         f"{len(values)}/{len(times) if name == 'ddp' else seeds} | {notes.replace('|', '/')} |")
        lines += ["", "Targets (issues 10 and 21), on the means:", ""] + targets(results, ddp, kind, args) + [""]
        names = [n for n, _ in all_rows(args) if any(n in r["rows"] for r in runs.values())]
        lines += ["Per seed (top-1 %):", "", "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for seed, r in runs.items():
            cells = [f"{r['rows'][n]['top1']:.2f}" if "top1" in r["rows"].get(n, {}) else
                     ("failed" if n in r["rows"] else "-") for n in names]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += batch_table(ddp.get(kind, {}))
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="folder of the four Fashion-MNIST IDX files")
    p.add_argument("--models", default="resnet,densenet,mobilenet", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--epochs", type=int, default=3, help="E: epochs of the original and the narrow baseline")
    p.add_argument("--ablations", action="store_true",
                   help="the loss, split and process ablations: every row on 20,000 images, 1 epoch, the DDP rows; "
                        "writes ACCURACY-ablations.md (default: the comparison on all 60,000 images at 1 and 3 epochs)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="training images used (0: all 60,000; default 0, --ablations 20000)")
    p.add_argument("--rows", default=None, type=names,
                   help=f"the 1-epoch rows to run (default {','.join(FULL_ROWS)}; --ablations: all)")
    p.add_argument("--long-rows", default="kd_logits,pruned_kd", type=names,
                   help="the rows run again for --long-epochs (default: rows 5 and 9b, the same loss for both)")
    p.add_argument("--long-epochs", type=int, default=None, help="epochs of the long rows (default 3; --ablations 0: none)")
    p.add_argument("--long-seeds", default=None, type=lambda s: [int(x) for x in s.split(",") if x],
                   help="seeds of the long rows, run after every seed's 1-epoch rows (default: all --seeds)")
    p.add_argument("--test-subset", type=int, default=0, help="test images used (0: all 10,000; --quick uses 1,000)")
    p.add_argument("--batch-size", type=int, default=128, help="batch of the from-scratch training (rows 1 and 8)")
    p.add_argument("--ddp-models", default=None, type=names,
                   help="models whose row 6 also runs under torchrun with 2 processes (default none; --ablations resnet)")
    p.add_argument("--ddp-seeds", default=None, type=lambda s: [int(x) for x in s.split(",") if x],
                   help="seeds of the DDP row (default: all --seeds)")
    p.add_argument("--no-pruned-kd", dest="pruned_kd", action="store_false",
                   help="skip row 9b (the pruned model fine-tuned with logit distillation)")
    p.add_argument("--jobs", type=int, default=3,
                   help="processes side by side, one per model, each with 1 thread (default 3; 1: one process)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of a single-process run (--jobs 1)")
    p.add_argument("--out", default=None, help="the note to write (default ACCURACY.md; --quick: a temporary file)")
    p.add_argument("--quick", action="store_true", help="a smoke run of the whole script in about a minute")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failed rows")
    p.add_argument("--note-only", action="store_true",
                   help="write the note again from the last run's saved results (benchmarks/.cache/results-*.json)")
    p.add_argument("--results", default=None,
                   help="with --note-only: the saved results to read, comma-separated (runs of different models "
                        "in parallel processes merge into one note)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ddp-result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-start", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-recipe", default="default", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    p.add_argument("--batch-seeds", default="0", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="seeds of the batch and processes table, for the --ddp-models (default 0; empty: none)")
    args = p.parse_args(argv)
    preset = ABLATIONS if args.ablations else FULL
    for key, value in preset.items():
        if key != "note" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.long_seeds is None:
        args.long_seeds = list(args.seeds)
    unknown = [r for r in args.rows + args.long_rows if r not in LABELS or r == "ddp"]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}: choose from {', '.join(n for n, _ in ROWS if n != 'ddp')}")
    unknown = [m for m in args.models + args.ddp_models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    if args.quick:
        args.epochs, args.train_subset = 1, 1024
        args.test_subset = args.test_subset or 1000
        args.seeds = args.seeds[:1]
        args.long_seeds, args.long_epochs = args.long_seeds[:1], min(args.long_epochs, 2)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.ddp_seeds is None:
        args.ddp_seeds = list(args.seeds)
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "ACCURACY.quick.md") if args.quick else str(ROOT / preset["note"])
    return args


def library_state() -> str:
    """Which cspify the run measured: its commit, and whether the working tree differed."""
    def git(*argv):
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD").strip()
    if not head:
        return f"version {cspify.__version__} (not a git checkout)"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "cspify", "rules").splitlines()]
    return f"commit {head}" + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")


SETTINGS = ("data", "seeds", "epochs", "train_subset", "test_subset", "batch_size", "threads", "pruned_kd", "quick",
            "ddp_models", "ddp_seeds", "batch_seeds", "rows", "long_rows", "long_epochs", "long_seeds", "ablations")


def save_results(path: Path, results: dict, ddp: dict, args, data: Data, elapsed: float) -> None:
    """The raw results and the run's settings beside the cache: the note can be written again
    from them (--note-only), and a parallel run merges its workers' files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {k: getattr(data, k) for k in ("channels", "size", "num_classes", "train_total", "val_total")}
    counts |= {"train_count": len(data.train_x), "val_count": len(data.val_x)}
    path.write_text(json.dumps({
        "command": args.command, "elapsed": elapsed, "library": getattr(args, "library", None),
        "settings": {k: getattr(args, k) for k in SETTINGS}, "counts": counts, "results": results, "ddp": ddp,
    }, indent=1))


def merge_results(paths: list[Path]) -> tuple[dict, dict, dict]:
    """Results, DDP results and the first file's other fields, from one or more saved files."""
    results, ddp, first = {}, {}, None
    for path in paths:
        saved = json.loads(path.read_text())
        for kind, runs in saved["results"].items():
            results[kind] = {int(seed): value for seed, value in runs.items()}
        for kind, runs in saved["ddp"].items():
            ddp[kind] = {int(seed): value for seed, value in runs.items()}
        first = first or saved
    return results, ddp, first


def note_from_saved(args, paths: list[Path], elapsed: float | None = None, command: str | None = None) -> None:
    results, ddp, saved = merge_results(paths)
    for key, value in saved.get("settings", {}).items():
        setattr(args, key, value)
    args.models = [m for m in MODELS if m in results]
    args.library = saved.get("library") or "not recorded"
    args.command = command or saved["command"]
    args.parallel = len(paths) > 1 or saved.get("parallel", False)
    counts = saved["counts"]
    data = argparse.Namespace(channels=counts["channels"], size=counts["size"], num_classes=counts["num_classes"],
                              train_total=counts["train_total"], val_total=counts["val_total"],
                              train_x=range(counts["train_count"]), val_x=range(counts["val_count"]))
    write_note(Path(args.out), results, ddp, args, data, elapsed if elapsed is not None else saved["elapsed"], done=True)


def results_path(out: str, quick: bool) -> Path:
    return CACHE / f"results-{Path(out).stem}{'-quick' if quick else ''}.json"


def run_parallel(args) -> None:
    """One worker process per model (1 thread each), side by side; then one note from all.
    On a small shared machine this beats one process with 2 threads, whose threads wait for
    each other whenever another job holds a core."""
    start = time.perf_counter()
    print(f"[  0.0 min] {len(args.models)} processes, one per model: logs in {CACHE}/accuracy-<model>.log", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    procs, paths = {}, []
    for kind in args.models:
        out = CACHE / f"ACCURACY-{kind}.md"
        child = [sys.executable, str(Path(__file__).resolve()), "--models", kind, "--jobs", "1", "--threads", "1",
                 "--seeds", ",".join(map(str, args.seeds)), "--epochs", str(args.epochs),
                 "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset or 0),
                 "--batch-size", str(args.batch_size), "--data", args.data, "--out", str(out),
                 "--ddp-models", ",".join(m for m in args.ddp_models if m == kind),
                 "--ddp-seeds", ",".join(map(str, args.ddp_seeds)), "--batch-seeds", ",".join(map(str, args.batch_seeds)),
                 "--rows", ",".join(args.rows), "--long-rows", ",".join(args.long_rows),
                 "--long-epochs", str(args.long_epochs), "--long-seeds", ",".join(map(str, args.long_seeds))]
        child += ["--no-pruned-kd"] * (not args.pruned_kd) + ["--quick"] * args.quick + ["--debug"] * args.debug
        child += ["--ablations"] * args.ablations
        log = open(CACHE / f"accuracy-{kind}.log", "w")
        procs[kind] = (subprocess.Popen(child, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
        paths.append(results_path(str(out), args.quick))
    for kind, (proc, log) in procs.items():
        proc.wait()
        log.close()
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {kind} finished (exit {proc.returncode})", flush=True)
    found = [p for p in paths if p.exists()]
    if not found:
        sys.exit("accuracy.py: no worker left results; see the logs in " + str(CACHE))
    elapsed = time.perf_counter() - start
    results, ddp, saved = merge_results(found)
    merged = {**saved, "command": args.command, "elapsed": elapsed, "parallel": True, "results": results, "ddp": ddp}
    results_path(args.out, args.quick).write_text(json.dumps(merged, indent=1))
    note_from_saved(args, [results_path(args.out, args.quick)])
    print(f"[{(time.perf_counter() - start) / 60:5.1f} min] wrote {args.out}", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return
    args.command = " ".join(["python benchmarks/accuracy.py"] + [shlex.quote(a) for a in argv if a != "--note-only"])
    if args.note_only:
        paths = [Path(p) for p in args.results.split(",")] if args.results else [results_path(args.out, args.quick)]
        note_from_saved(args, paths)
        print(f"wrote {args.out} from {', '.join(map(str, paths))}")
        return
    if args.jobs > 1 and len(args.models) > 1:
        run_parallel(args)
        return
    torch.set_num_threads(args.threads)
    raw = results_path(args.out, args.quick)
    args.library = library_state()
    start = time.perf_counter()

    def log(message):
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    data = open_benchmark_data(args.data, args.train_subset, args.test_subset)
    log(f"data: {len(data.train_x)} training, {len(data.val_x)} test images; models {args.models}, "
        f"seeds {args.seeds}, E={args.epochs}")
    results, ddp = {}, {}
    out = Path(args.out)
    for kind in args.models:
        states = {seed: {} for seed in args.seeds}
        for seed in args.seeds:
            results.setdefault(kind, {})[seed] = run_one(kind, seed, args, data, log, states[seed])
            save_results(raw, results, ddp, args, data, time.perf_counter() - start)
            write_note(out, results, ddp, args, data, time.perf_counter() - start, done=False)
        for seed in args.long_seeds if args.long_epochs else ():  # last: the 1-epoch rows of every seed come first
            run_long(kind, seed, args, data, log, states[seed], results[kind][seed])
            save_results(raw, results, ddp, args, data, time.perf_counter() - start)
            write_note(out, results, ddp, args, data, time.perf_counter() - start, done=False)
        if kind in args.ddp_models:
            for seed in args.ddp_seeds:
                ddp.setdefault(kind, {})[seed] = run_ddp(kind, seed, args, log)
                save_results(raw, results, ddp, args, data, time.perf_counter() - start)
                write_note(out, results, ddp, args, data, time.perf_counter() - start, done=False)
            for seed in args.batch_seeds:
                ddp.setdefault(kind, {}).setdefault(seed, {})["batches"] = run_batches(kind, seed, args, data, log)
                save_results(raw, results, ddp, args, data, time.perf_counter() - start)
                write_note(out, results, ddp, args, data, time.perf_counter() - start, done=False)
    save_results(raw, results, ddp, args, data, time.perf_counter() - start)
    write_note(out, results, ddp, args, data, time.perf_counter() - start, done=True)
    log(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
