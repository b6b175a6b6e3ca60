"""A sweep: convert at every (gamma, fusion, hidden) point and put the savings in one table.

    result = sweep(model, torch.randn(1, 3, 224, 224), gammas=(0.25, 0.5, 0.75), fusions=("last", "first"))
    print(result)                  # one row per point: flops, params, memory traffic (, latency)
    result.to_dict(); result.to_markdown()

The original model is measured once; each point is converted and measured once. With
``latency=True`` each point is also timed against the original (``cspify.benchmark``).
A point where no stage can be converted gets a row that says why instead of stopping
the sweep.
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
from cspify.bench import DEFAULT_THREADS, BenchRow, benchmark, resolve_devices
from cspify.config import CSPConfig
from cspify.errors import ConfigError, NoStageError
from cspify.measure import FLOP_NOTE, Figures, measure
from cspify.record import conversion_of
from cspify.report import human, percent
from cspify.trace import as_inputs, capture_inputs


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


@dataclass
class Sweep:
    original: Figures
    points: list[SweepPoint]
    device: str = "cpu"
    threads: int | None = None

    @property
    def has_latency(self) -> bool:
        return any(p.latency for p in self.points)

    def to_dict(self) -> dict:
        points = []
        for p in self.points:
            point = {"gamma": p.gamma, "fusion": p.fusion, "hidden": p.hidden,
                     "figures": p.figures.to_dict() if p.figures else None,
                     "stages_converted": p.stages_converted, "stages_found": p.stages_found, "reason": p.reason}
            if p.latency:
                point["latency"] = [{"batch_size": r.batch_size, "original_ms": r.original.median_ms,
                                     "converted_ms": r.converted.median_ms, "speedup": r.speedup} for r in p.latency]
            points.append(point)
        return {"original": self.original.to_dict(), "points": points, "device": self.device,
                "threads": self.threads, "flop_note": FLOP_NOTE}

    def table(self, fmt: str = "simple") -> str:
        o = self.original
        headers = ["gamma", "fusion", "hidden", "stages", "flops", "saved", "params", "saved", "traffic", "saved"]
        rows = [["original", "", "", "", human(o.flops), "", human(o.params), "", human(o.memory_bytes, "B"), ""]]
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
            timed = {r.batch_size: r for r in p.latency}
            for b in batches:
                r = timed.get(b)
                row += [f"{r.original.median_ms:.1f} -> {r.converted.median_ms:.1f}", f"{r.speedup:.2f}x"] if r else ["-", "-"]
            rows.append(row)
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def _notes(self) -> list[str]:
        notes = [f"gamma {p.gamma:g}, {p.fusion}, {p.hidden}: {p.reason}" for p in self.points if p.reason]
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
) -> Sweep:
    """Convert ``model`` at every combination of the options and measure each result;
    with ``latency``, time each one against the original on ``device`` ("cpu" or "cuda")."""
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
    points = []
    for config in tqdm(configs, desc="cspify sweep", unit="point", file=sys.stderr, disable=not progress):
        point = SweepPoint(config.gamma, config.fusion, config.hidden, None)
        try:
            csp = api.convert(model, inputs, config=config, scope=scope, leaf_modules=leaf_modules)
        except NoStageError as error:
            point.reason = error.message.split(" (")[0].rstrip(".") + f" ({error.hint})"
            points.append(point)
            continue
        record = conversion_of(csp, scope)
        point.figures = measure(csp.get_submodule(scope) if scope else csp, part_inputs, leaf_modules).totals
        point.stages_found, point.stages_converted = len(record.stages), len(record.converted)
        if latency:
            point.latency = benchmark(model, csp, inputs, batch_sizes, threads, device, min_run_time=min_run_time).rows
        points.append(point)
    return Sweep(before.totals, points, device, int(threads or DEFAULT_THREADS))
