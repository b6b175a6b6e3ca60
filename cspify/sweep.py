"""A sweep: convert at every (gamma, fusion, hidden) point and put the savings in one table.

    result = sweep(model, torch.randn(1, 3, 224, 224), gammas=(0.25, 0.5, 0.75), fusions=("last", "first"))
    print(result)                  # one row per point: flops, params, memory traffic (, latency)
    result.to_dict(); result.to_markdown()

The original model is measured once; each point is converted and measured once. With
``latency=True`` each point is also timed against the original (``cspify.benchmark``).
A point where no stage can be converted gets a row that says why instead of stopping
the sweep.

With ``data`` (an ImageData, ``cspify.data.open_data``), each point is also calibrated on
its training images and, with ``finetune_epochs=N``,
distilled from the original for N epochs; then scored on its validation images: top-1, and
agreement with the original's predictions (no labels needed). That is the paper's gamma
ablation on the user's own model and data: top-1 against flops, and against latency.
Ctrl-C (or SIGTERM) ends the sweep with the points done so far (``Sweep.stopped``).

    result = sweep(model, x, gammas=(0.25, 0.5, 0.75), data=open_data("fashion-mnist"), finetune_epochs=1)
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.nn as nn
from tabulate import tabulate
from tqdm import tqdm

from cspify import api
from cspify.batches import image_batches
from cspify.bench import DEFAULT_THREADS, BenchRow, benchmark, resolve_devices
from cspify.calibrate import calibrate
from cspify.config import CSPConfig
from cspify.errors import ConfigError, NoStageError
from cspify.finetune import evaluate, finetune
from cspify.measure import FLOP_NOTE, Figures, measure
from cspify.record import conversion_of
from cspify.report import human, percent
from cspify.trace import as_inputs, capture_inputs, device_of, eval_mode


@dataclass(frozen=True)
class Accuracy:
    """A point's model scored on the validation images, after calibration (and fine-tuning)."""

    top1: float        # share of the validation images it classifies right
    agreement: float   # share where it predicts what the original predicts
    epochs: int = 0    # of fine-tuning with distillation after calibration


@dataclass
class SweepPoint:
    gamma: float
    fusion: str
    hidden: str
    figures: Figures | None          # None when no stage could be converted
    stages_converted: int = 0
    stages_found: int = 0
    reason: str = ""
    latency: list[BenchRow] = field(default_factory=list)
    accuracy: Accuracy | None = None


@dataclass
class Sweep:
    original: Figures
    points: list[SweepPoint]
    device: str = "cpu"
    threads: int | None = None
    original_top1: float | None = None   # with data: the original's top-1 on the validation images
    planned: int = 0                     # the points asked for (more than ``points`` where it stopped)
    stopped: BaseException | None = None  # the Ctrl-C (or SIGTERM) that ended it early, or None

    @property
    def has_latency(self) -> bool:
        return any(p.latency for p in self.points)

    @property
    def has_accuracy(self) -> bool:
        return any(p.accuracy for p in self.points)

    def to_dict(self) -> dict:
        points = []
        for p in self.points:
            point = {"gamma": p.gamma, "fusion": p.fusion, "hidden": p.hidden,
                     "figures": p.figures.to_dict() if p.figures else None,
                     "stages_converted": p.stages_converted, "stages_found": p.stages_found, "reason": p.reason}
            if p.accuracy:
                point["accuracy"] = {"top1": p.accuracy.top1, "agreement": p.accuracy.agreement,
                                     "finetune_epochs": p.accuracy.epochs}
            if p.latency:
                point["latency"] = [{"batch_size": r.batch_size, "original_ms": r.original.median_ms,
                                     "converted_ms": r.converted.median_ms, "speedup": r.speedup} for r in p.latency]
            points.append(point)
        return {"original": self.original.to_dict(), "original_top1": self.original_top1, "points": points,
                "planned": self.planned or len(points), "stopped": self.stopped is not None, "device": self.device,
                "threads": self.threads, "flop_note": FLOP_NOTE}

    def table(self, fmt: str = "simple") -> str:
        o = self.original
        headers = ["gamma", "fusion", "hidden", "stages", "flops", "saved", "params", "saved", "traffic", "saved"]
        rows = [["original", "", "", "", human(o.flops), "", human(o.params), "", human(o.memory_bytes, "B"), ""]]
        if self.has_accuracy:
            headers += ["top-1", "agreement"]
            rows[0] += [_share(self.original_top1), ""]
        batches = sorted({r.batch_size for p in self.points for r in p.latency})
        for b in batches:
            headers += [f"ms @{b}", "speed-up"]
        for p in self.points:
            row = [f"{p.gamma:g}", p.fusion, p.hidden, f"{p.stages_converted}/{p.stages_found}" if p.figures else "none"]
            f = p.figures
            if f is None:
                row += ["-"] * 6
            else:
                row += [human(f.flops), percent(o.flops, f.flops), human(f.params), percent(o.params, f.params),
                        human(f.memory_bytes, "B"), percent(o.memory_bytes, f.memory_bytes)]
            if self.has_accuracy:
                a = p.accuracy
                row += [_share(a.top1), _share(a.agreement)] if a else ["-", "-"]
            timed = {r.batch_size: r for r in p.latency}
            for b in batches:
                r = timed.get(b)
                row += [f"{r.original.median_ms:.1f} -> {r.converted.median_ms:.1f}", f"{r.speedup:.2f}x"] if r else ["-", "-"]
            rows.append(row)
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def _notes(self) -> list[str]:
        notes = [f"gamma {p.gamma:g}, {p.fusion}, {p.hidden}: {p.reason}" for p in self.points if p.reason]
        if self.has_accuracy:
            epochs = max(p.accuracy.epochs for p in self.points if p.accuracy)
            notes.append("top-1 and agreement (with the original's predictions) on the validation images, each point "
                         "calibrated" + (f" and distilled for {epochs} epoch(s)" if epochs else " (no gradient step)"))
        if self.stopped is not None:
            notes.append(f"stopped after {len(self.points)} of {self.planned} points: the rows are those done")
        if self.has_latency:
            notes.append(f"latency: median ms original -> converted on {self.device}, {self.threads} thread(s)")
        return notes

    def __str__(self) -> str:
        lines = [f"CSP sweep over {len(self.points)} points", "", self.table()]
        lines += [""] + [f"note: {n}" for n in self._notes()] if self._notes() else []
        return "\n".join(lines + ["", f"({FLOP_NOTE}; traffic = bytes each op reads and writes)"])

    def to_markdown(self) -> str:
        lines = [f"## CSP sweep over {len(self.points)} points", "", self.table("github"), ""]
        lines += [f"- {n}" for n in self._notes()]
        return "\n".join(lines + ["", f"_{FLOP_NOTE}; traffic is the bytes each op reads and writes._", ""])


def sweep(
    model: nn.Module,
    example_inputs,
    gammas: Iterable[float] = (0.25, 0.5, 0.75),
    fusions: Iterable[str] = ("last",),
    hiddens: Iterable[str] = ("keep",),
    *,
    stages: Iterable[str] | None = None,
    allow_costlier: bool = False,
    scope: str | None = None,
    leaf_modules: Iterable[str] = (),
    kinds: Iterable[str] | str | None = None,
    round_to: int = 1,
    latency: bool = False,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    device: str = "cpu",
    min_run_time: float = 1.0,
    progress: bool = False,
    data=None,
    finetune_epochs: int = 0,
    calibration_images: int = 2048,
    batch_size: int = 128,
) -> Sweep:
    """Convert ``model`` at every combination of the options and measure each result;
    with ``latency``, time each one against the original on ``device`` ("cpu" or "cuda");
    with ``data`` (an ImageData), calibrate (and, ``finetune_epochs``, distil) and score
    each one (see the module's docstring)."""
    if latency:  # a bad device is refused before any conversion
        if device == "auto":
            raise ConfigError("a sweep times on one device, got 'auto'.", "pass device='cpu' or device='cuda'")
        resolve_devices(device)
    configs = [
        CSPConfig(g, f, h, tuple(stages) if stages else None, allow_costlier, kinds, round_to=round_to)
        for g, f, h in itertools.product(gammas, fusions, hiddens)
    ]
    inputs = as_inputs(example_inputs)
    part, part_inputs = capture_inputs(model, inputs, scope) if scope else (model, inputs)
    before = measure(part, part_inputs, leaf_modules)
    if finetune_epochs and data is None:
        raise ConfigError("finetune_epochs fine-tunes each point on data, and there is none.",
                          "give data (--data DATA), or leave finetune_epochs at 0")
    result = Sweep(before.totals, [], device, int(threads or DEFAULT_THREADS), planned=len(configs))
    scorer = _Scorer(model, data) if data is not None else None
    if scorer is not None:
        result.original_top1 = scorer.original_top1
    try:
        for config in tqdm(configs, desc="cspify sweep", unit="point", file=sys.stderr, disable=not progress):
            point = SweepPoint(config.gamma, config.fusion, config.hidden, None)
            try:
                csp = api.convert(model, inputs, config=config, scope=scope, leaf_modules=leaf_modules,
                                  data=data.train if data is not None else None)
            except NoStageError as error:
                point.reason = error.message.split(" (")[0].rstrip(".") + f" ({error.hint})"
                result.points.append(point)
                continue
            record = conversion_of(csp, scope)
            point.figures = measure(csp.get_submodule(scope) if scope else csp, part_inputs, leaf_modules).totals
            point.stages_found, point.stages_converted = len(record.stages), len(record.converted)
            if latency:
                point.latency = benchmark(model, csp, inputs, batch_sizes, threads, device,
                                          min_run_time=min_run_time).rows
            if scorer is not None:
                point.accuracy = scorer.score(csp, calibration_images, finetune_epochs, batch_size, progress)
            result.points.append(point)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the points done so far are the result
        result.stopped = stop
    return result


def _share(value: float | None) -> str:
    return f"{100 * value:.2f}%" if value is not None else "-"


class _Scorer:
    """Each point calibrated (and distilled) on ``data``'s training images, then scored on
    its validation images against the labels and against the original's predictions."""

    def __init__(self, model: nn.Module, data) -> None:
        self.model, self.data = model, data
        self.device = device_of(model)
        self.val = image_batches(data.val, len(data.val), 256)
        with eval_mode(model):
            self.expected = [model(x.to(self.device)).argmax(1) for x in self.val]
        self.original_top1 = evaluate(model, data.val, self.device)

    def score(self, csp: nn.Module, images: int, epochs: int, batch_size: int, progress: bool) -> Accuracy:
        calibrate(self.model, csp, self.data.train, max_images=min(images, len(self.data.train)))
        if epochs:
            finetune(csp, self.data.train, teacher=self.model, epochs=epochs, batch_size=batch_size,
                     device=self.device, progress=progress)
        with eval_mode(csp):
            same = sum(int((csp(x.to(self.device)).argmax(1) == y).sum()) for x, y in zip(self.val, self.expected))
        return Accuracy(evaluate(csp, self.data.val, self.device), same / max(len(self.data.val), 1), epochs)
