"""Measured latency: the original and the converted model timed side by side in one run.

    result = benchmark(model, csp, torch.randn(1, 3, 224, 224), batch_sizes=(1, 16))
    print(result)              # median ms and IQR of both, the speed-up, per batch size
    result.rows[0].speedup     # original median / converted median
    result.to_dict()

Timing uses ``torch.utils.benchmark.Timer`` (warm-up, then ``blocked_autorange``) in
eval mode under ``torch.inference_mode``. The two models alternate, ``rounds`` times,
taking turns at going first, so a burst of load on a shared machine hits both alike.
Each model gets the median, IQR and minimum of all its timed blocks; the speed-up is
the ratio of the medians, and the ratio of the fastest blocks is shown beside it as a
second opinion (interference only ever adds time). How far either moves between whole
runs on a given machine: ``python benchmarks/stability.py``. The example input's first
sample is repeated to each batch size. On CUDA, the Timer synchronizes the device around
each measurement.

Where ``converted`` was converted with ``objective="latency"`` (or a latency budget), its
record holds each stage's times, the whole model without it and with it; the result
shows them as a per-stage table (``BenchResult.stages``).

The share of the process's CPU time spent in the kernel while each model ran is kept
too. On Linux with glibc's malloc, large activations are mapped afresh and handed back
to the OS on every forward pass; zeroing those pages took 32% of the CPU time for
resnext50 at batch 16 on a 2-core machine, and most of the noise. A note then says how to time the
models rather than the allocator.

Both models are timed with one thread unless ``threads`` asks for more, and the machine's
load (the 1-minute load average, before and after timing, against ``os.cpu_count()``) is
stated beside the figures. A figure is marked unreliable (``?`` in the table, its reasons
in one note line and in the JSON's ``unreliable``) where

- the load of other work (the peak load less the timed threads) leaves fewer cores free
  than the threads timed, or more threads are timed than there are cores;
- either model's IQR is over ``SPREAD_NOTE`` (10%) of its median;
- the timed process, on one CPU thread, got under ``CPU_SHARE_NOTE`` of the wall time on a
  core (it was waiting for one);
- a model's median is above ``SLOW_ALLOWANCE_MS`` plus its flops at ``SLOW_FLOPS_PER_S``, a
  slow single core: no machine that is free to run it takes that long;
- the latency ratio lies outside ``RATIO_RANGE`` (a conversion does not make a model
  five times faster, and twice as slow, "saved" below -100%, is a result to check), or
  latency saved / flops saved outside ``EFFICIENCY_RANGE``: such a ratio is shown as
  ``?``, its value only in the note and the JSON.

``benchmark(..., progress=True)`` shows a progress line (blocks timed, ETA) on stderr.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tabulate import tabulate

from cspify.errors import ConfigError
from cspify.record import conversion_of
from cspify.trace import as_inputs

DEVICES = ("auto", "cpu", "cuda")  # auto: the CPU, and CUDA too when present
DEFAULT_THREADS = 1  # timed threads unless asked: other work on a small machine stalls fewer of them
KERNEL_SHARE_NOTE = 0.2
SPREAD_NOTE = 0.10  # IQR over median
CPU_SHARE_NOTE = 0.7  # of the wall time, the one timed thread on a core
MIN_SHARE_WALL_S = 0.5  # timed seconds below which the CPU clocks are too coarse to give that share
SLOW_FLOPS_PER_S = 2e8  # fvcore flops a second: a slow single core (a 2015 laptop core does 10x that)
SLOW_ALLOWANCE_MS = 50.0  # per call, on top: Python and the framework's per-op overhead
RATIO_RANGE = (0.2, 2.0)  # converted / original median latency
EFFICIENCY_RANGE = (-1.0, 2.0)  # latency saved / flops saved
UNRELIABLE_HINT = "close other work, time with --threads 1, or give it more --rounds and --min-run-time"
ALLOCATOR_HINT = ("MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 set (glibc keeps freed blocks) "
                  "or jemalloc/tcmalloc preloaded")


@dataclass
class Timing:
    """One model at one batch size: median, interquartile range and minimum in milliseconds."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    runs: int
    kernel_share: float = 0.0  # of the process's CPU time while timed, spent in the kernel
    cpu_share: float | None = None  # the process's CPU time over wall time and threads, while timed

    @property
    def spread(self) -> float:
        """IQR over median: above 0.10 the machine was busy while this was timed."""
        return self.iqr_ms / self.median_ms


@dataclass(frozen=True)
class Load:
    """The machine's 1-minute load average just before and just after timing (None where the
    platform has none), and its cores (``os.cpu_count()``)."""

    before: float | None
    after: float | None
    cores: int

    @property
    def peak(self) -> float | None:
        known = [v for v in (self.before, self.after) if v is not None]
        return max(known) if known else None

    def others(self, threads: int) -> float | None:
        """The load of other work: the peak, less the timed threads (they count in it too)."""
        return None if self.peak is None else max(0.0, self.peak - threads)

    def __str__(self) -> str:
        if self.peak is None:
            return f"load unknown, {self.cores} cores"
        return (f"load {_load_text(self.before)} before, {_load_text(self.after)} after timing "
                f"on {self.cores} cores (1-min average)")


def _load_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def machine_load() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_cores() -> int:
    return os.cpu_count() or 1


@dataclass
class BenchRow:
    batch_size: int
    original: Timing
    converted: Timing
    device: str = "cpu"

    @property
    def latency_ratio(self) -> float:
        """Converted over original median latency."""
        return self.converted.median_ms / self.original.median_ms

    @property
    def fastest_ratio(self) -> float:
        """Converted over original latency from each model's fastest block: the second opinion."""
        return self.converted.min_ms / self.original.min_ms

    @property
    def speedup(self) -> float:
        """Original latency over converted latency (above 1: the converted model is faster)."""
        return 1.0 / self.latency_ratio

    @property
    def latency_saved(self) -> float:
        """Fraction of the original latency the conversion saved."""
        return 1.0 - self.latency_ratio


@dataclass
class StageTime:
    """One stage, timed as the conversion's objective timed it: the whole model's median ms,
    without this stage and with it (the other chosen stages converted in both)."""

    name: str
    without_ms: float
    with_ms: float

    @property
    def saved(self) -> float:
        return 1.0 - self.with_ms / self.without_ms


@dataclass
class BenchResult:
    """Timings of both models per batch size; ``flops`` (original, converted) on the example
    input (of ``example_batch`` samples) when known, of the submodule ``flops_scope`` where
    set; ``load``: the machine's, around the timing; ``stages``: per stage, the times the
    conversion's latency objective measured."""

    rows: list[BenchRow]
    device: str
    threads: int
    flops: tuple[int, int] | None = None
    load: Load | None = None
    stages: list[StageTime] = field(default_factory=list)
    example_batch: int = 1
    flops_scope: str | None = None  # the submodule the flops count (--scope); None: the whole model

    def efficiency(self, row: BenchRow) -> float | None:
        """Latency saved over flops saved (1.0: the time fell as much as the flops), where flops fell."""
        if not self.flops or not self.flops[0] or self.flops[1] >= self.flops[0]:
            return None
        return row.latency_saved / (1 - self.flops[1] / self.flops[0])

    def doubts(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Why figures are unreliable: for the whole run, for each row, for the stage times."""
        return (_machine_doubts(self.threads, self.load, {row.device for row in self.rows}),
                [_row_doubts(self, row) + _efficiency_doubt(self, row) for row in self.rows],
                [f"stage {s.name} saved {100 * s.saved:.0f}%, below -100%" for s in self.stages if s.saved < -1])

    @property
    def notes(self) -> list[str]:
        """What a reader should know before trusting these figures: one line on which are
        unreliable and why, and one on the kernel's share of the CPU time."""
        machine, rows, stages = self.doubts()
        several = len({row.device for row in self.rows}) > 1
        parts = machine + [f"batch {row.batch_size}{f' ({row.device})' if several else ''}: {'; '.join(why)}"
                           for row, why in zip(self.rows, rows) if why] + stages
        notes = [f"unreliable figures (marked ?): {'; '.join(parts)}; {UNRELIABLE_HINT}"] if parts else []
        return notes + _kernel_notes(self.rows)

    def to_dict(self) -> dict:
        machine, rows, _ = self.doubts()
        return {
            "device": self.device,
            "threads": self.threads,
            "load": asdict(self.load) if self.load else None,
            "torch": torch.__version__,
            "flops": list(self.flops) if self.flops else None,
            "rows": [
                {**asdict(row), **{key: round(getattr(row, key), 4)
                                   for key in ("latency_ratio", "fastest_ratio", "speedup", "latency_saved")},
                 "saved_per_flops_saved": _rounded(self.efficiency(row)), "unreliable": machine + why}
                for row, why in zip(self.rows, rows)
            ],
            "stages": [{**asdict(s), "saved": round(s.saved, 4), "unreliable": s.saved < -1} for s in self.stages],
            "notes": self.notes,
        }

    def table(self, fmt: str = "simple") -> str:
        several = len({row.device for row in self.rows}) > 1
        headers = ["device"] * several + ["batch", "original ms", "IQR", "min", "converted ms", "IQR", "min",
                                          "latency ratio", "of fastest", "speed-up"]
        if self.flops:
            headers += ["flops ratio", "latency saved / flops saved"]
        machine = _machine_doubts(self.threads, self.load, {row.device for row in self.rows})
        rows = []
        for row in self.rows:
            mark = "?" if machine or _row_doubts(self, row) else ""  # the timings themselves in doubt
            line = [row.device] * several + [row.batch_size]
            for t in (row.original, row.converted):
                line += [f"{t.median_ms:.2f}", f"{t.iqr_ms:.2f}", f"{t.min_ms:.2f}"]
            line += [_ratio_text(row.latency_ratio, ".3f", mark), _ratio_text(row.fastest_ratio, ".3f", mark),
                     _ratio_text(row.speedup, ".3f", mark, "x")]
            if self.flops:
                efficiency = self.efficiency(row)
                line.append(f"{self.flops[1] / self.flops[0]:.3f}" if self.flops[0] else "-")
                line.append("-" if efficiency is None else "?" if not _within(efficiency, EFFICIENCY_RANGE)
                            else f"{efficiency:.2f}{mark}")
            rows.append(line)
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                        colalign=("right",) * len(headers))

    def stage_table(self, fmt: str = "simple") -> str:
        """Per stage: the whole model's ms without that stage and with it."""
        rows = [[s.name, f"{s.without_ms:.2f}", f"{s.with_ms:.2f}", f"{100 * s.saved:.1f}%" if s.saved >= -1 else "?"]
                for s in self.stages]
        return tabulate(rows, headers=["stage", "model ms without it", "with it", "saved"], tablefmt=fmt,
                        disable_numparse=True, colalign=("left", "right", "right", "right"))

    def __str__(self) -> str:
        runs = min((t.runs for row in self.rows for t in (row.original, row.converted)), default=0)
        parts = [f"latency on {self.device}, {self.threads} thread(s), {self.load or 'load unknown'}, "
                 f"torch {torch.__version__} (at least {runs} timed blocks per model, the models alternating)",
                 "", self.table(),
                 "", "(latency ratio = converted / original median; of fastest: the same from each model's "
                     "fastest block"]
        if self.flops:
            parts[-1] += ("; flops ratio = converted / original fvcore flops; latency saved / flops saved: "
                          "1.0 means the time fell as much as the flops")
        parts[-1] += ")"
        if self.stages:
            parts += ["", "per stage, as the latency objective timed it when converting:", self.stage_table()]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        text = (f"## Latency ({self.device}, {self.threads} threads, {self.load or 'load unknown'})\n\n"
                f"{self.table('github')}\n")
        if self.stages:
            text += f"\n### Per stage, as the latency objective timed it\n\n{self.stage_table('github')}\n"
        notes = self.notes
        return text + ("\n" + "".join(f"- note: {n}\n" for n in notes) if notes else "")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def _ratio_text(value: float, spec: str, mark: str, unit: str = "") -> str:
    """A ratio of two medians: ``?`` alone where no timing can give it (not positive)."""
    return f"{value:{spec}}{unit}{mark}" if value > 0 else "?"


def _machine_doubts(threads: int, load: Load | None, devices: set[str]) -> list[str]:
    """Why every figure of a run is unreliable: the machine's load against the timed threads."""
    if load is None:
        return []
    if "cpu" in devices and threads > load.cores:
        return [f"{threads} threads timed on {load.cores} cores"]
    timed = threads if "cpu" in devices else 1  # on CUDA, the one host thread that launches the kernels
    others = load.others(timed)
    if others is not None and others > load.cores - timed:
        return [f"the machine's other work (load {load.peak:.2f} less the {timed} timed thread(s)) leaves under "
                f"{timed} of its {load.cores} cores free"]
    return []


def _row_doubts(result: BenchResult, row: BenchRow) -> list[str]:
    """Why one batch size's timings are unreliable: spread, a starved or slow model, a ratio out of range."""
    why = []
    spread = {name: t.spread for name, t in (("original", row.original), ("converted", row.converted))}
    if max(spread.values()) > SPREAD_NOTE:
        why.append(f"IQR over {100 * SPREAD_NOTE:.0f}% of the median ("
                   + ", ".join(f"{name} {100 * v:.0f}%" for name, v in spread.items()) + ")")
    shares = {name: t.cpu_share for name, t in (("original", row.original), ("converted", row.converted))
              if t.cpu_share is not None}
    if row.device == "cpu" and result.threads == 1 and shares and min(shares.values()) < CPU_SHARE_NOTE:
        why.append("the timed thread got a core for only part of the time ("
                   + ", ".join(f"{name} {100 * v:.0f}%" for name, v in shares.items()) + ")")
    for name, t, flops in (("original", row.original, result.flops and result.flops[0]),
                           ("converted", row.converted, result.flops and result.flops[1])):
        if flops and result.flops_scope is None:  # a part's flops say nothing of the whole model's time
            bound = SLOW_ALLOWANCE_MS + 1e3 * flops * row.batch_size / max(result.example_batch, 1) / SLOW_FLOPS_PER_S
            if t.median_ms > bound:
                why.append(f"the {name} median {t.median_ms:.2f} ms is over the {bound:.1f} ms its flops take "
                           f"on a slow core ({SLOW_FLOPS_PER_S / 1e9:g} GFLOP/s, plus {SLOW_ALLOWANCE_MS:g} ms)")
    if not _within(row.latency_ratio, RATIO_RANGE):
        why.append(f"latency ratio {row.latency_ratio:.3f} lies outside {RATIO_RANGE[0]:g} to {RATIO_RANGE[1]:g}"
                   + (f" (saved {100 * row.latency_saved:.0f}%, below -100%)" if row.latency_saved < -1 else ""))
    return why


def _efficiency_doubt(result: BenchResult, row: BenchRow) -> list[str]:
    """Latency saved / flops saved out of range: that one figure, whatever the timings' trust."""
    efficiency = result.efficiency(row)
    if efficiency is None or _within(efficiency, EFFICIENCY_RANGE):
        return []
    return [f"latency saved / flops saved {efficiency:.2f} lies outside {EFFICIENCY_RANGE[0]:g} to "
            f"{EFFICIENCY_RANGE[1]:g}: the time did not follow the flops (too few saved to divide by, or costs "
            "other than flops), so it is shown as ?"]


def benchmark(
    original: nn.Module,
    converted: nn.Module,
    example_inputs,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    device: str = "cpu",
    *,
    min_run_time: float = 1.0,
    rounds: int = 5,
    flops: tuple[int, int] | None = None,
    progress: bool = False,
) -> BenchResult:
    """Time both models at each batch size, side by side; the models are not modified.

    ``device`` is "cpu", "cuda", or "auto" (the CPU, and CUDA too when present);
    ``threads`` defaults to one (``DEFAULT_THREADS``), and the machine's load is sampled
    before and after timing; ``min_run_time`` is the seconds each ``blocked_autorange``
    runs per model and round (lower it for quick looks); ``rounds`` how often the two
    models take turns; ``flops``: both models' fvcore flops on ``example_inputs``, to
    judge the timings by (``cspify.compare`` gives them); ``progress``: a progress line
    (blocks timed, ETA) on stderr.
    """
    devices = resolve_devices(device)
    threads = DEFAULT_THREADS if threads is None else int(threads)
    if threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads}.", "pass --threads 1 or more")
    if rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds}.", "pass --rounds 1 or more")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}.",
                          "write them as --batch-sizes 1,16")
    inputs = as_inputs(example_inputs)
    example_batch = next((len(x) for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    rows = []
    bar = _progress_bar(len(devices) * len(sizes) * rounds * 2, progress)
    before = machine_load()
    try:
        for where in devices:
            models = {name: copy.deepcopy(m).eval().to(where) for name, m in (("original", original),
                                                                              ("converted", converted))}
            for batch in sizes:
                bar.set_postfix_str(f"batch {batch} on {where}", refresh=False)
                batch_inputs = tuple(_batched(x, batch, where) for x in inputs)
                rows.append(_time_side_by_side(batch, where, models, batch_inputs, threads, min_run_time, rounds,
                                               bar.update))
    finally:
        bar.close()
    load = Load(before, machine_load(), cpu_cores())
    return BenchResult(rows, ", ".join(devices), threads, flops=flops, load=load, stages=_stage_times(converted),
                       example_batch=max(example_batch, 1))


def _progress_bar(total: int, enabled: bool):
    """The blocks timed so far and the ETA, on stderr (a bar that does nothing when not enabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="cspify: timing both models", unit="block", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


def _stage_times(converted: nn.Module) -> list[StageTime]:
    """The per-stage times a latency objective left in the conversion record, if any."""
    record = conversion_of(converted)
    if record is None:
        record = next((conversion_of(m) for m in converted.modules() if conversion_of(m) is not None), None)
    return [StageTime(s.name, s.time_before_ms, s.time_after_ms) for s in (record.stages if record else ())
            if s.time_before_ms is not None and s.time_after_ms is not None]


def _kernel_notes(rows: list[BenchRow]) -> list[str]:
    """The kernel's share of the CPU time, where it is large enough to be what was timed."""
    notes = []
    kernel = max((t.kernel_share for row in rows if row.device == "cpu" for t in (row.original, row.converted)),
                 default=0.0)  # on CUDA the host's page faults are not what is timed
    if kernel > KERNEL_SHARE_NOTE:
        settled = all(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        notes.append(
            f"{100 * kernel:.0f}% of the CPU time went to the kernel, mostly page faults"
            + (" even with glibc's allocator settings (glibc maps a tensor over 32 MiB afresh on every forward, "
               "whatever its thresholds), so these timings measure the system as much as the models; try jemalloc "
               "or tcmalloc preloaded" if settled else
               f" on freshly mapped activations, so these timings measure the memory allocator as much as the "
               f"models; rerun with {ALLOCATOR_HINT}"))
    return notes


def _timer_module():
    """torch.utils.benchmark, imported on first use: it imports cpp_extension, which warns
    about a missing CUDA toolkit on CPU machines (silenced for that import only)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


def _time_side_by_side(batch: int, device: str, models: dict, inputs: tuple, threads: int, min_run_time: float,
                       rounds: int, done=lambda n: None) -> BenchRow:
    """Both models timed in turn, ``rounds`` times; ``done(1)`` after each block of timing."""
    tbench = _timer_module()
    timers = {
        name: tbench.Timer(
            stmt="model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=threads,
            label="cspify", description=name,
        )
        for name, model in models.items()
    }
    measured = {name: [] for name in models}
    cpu = {name: [0.0, 0.0, 0.0, 0.0] for name in models}  # user, system, process CPU, wall seconds
    order = list(timers)
    with torch.inference_mode():
        for timer in timers.values():  # warm-up: allocator, kernels, caches
            timer.timeit(3)
        for _ in range(rounds):
            for name in order:
                before, cpu_before, wall_before = os.times(), time.process_time(), time.perf_counter()
                measured[name].append(timers[name].blocked_autorange(min_run_time=min_run_time))
                after, cpu_after, wall_after = os.times(), time.process_time(), time.perf_counter()
                for i, spent in enumerate((after.user - before.user, after.system - before.system,
                                           cpu_after - cpu_before, wall_after - wall_before)):
                    cpu[name][i] += spent
                done(1)
            order.reverse()  # each model goes first in every other round
    timing = {}
    for name, parts in measured.items():
        merged = tbench.Measurement.merge(parts)[0]
        user, system, process, wall = cpu[name]
        timing[name] = Timing(merged.median * 1e3, merged.iqr * 1e3, min(merged.times) * 1e3, len(merged.times),
                              system / (user + system) if user + system > 0 else 0.0,
                              round(process / (wall * threads), 3) if wall >= MIN_SHARE_WALL_S else None)
    return BenchRow(batch, timing["original"], timing["converted"], device)


def _batched(x, batch: int, device: str):
    """The example input's first sample repeated ``batch`` times, on ``device``."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x[:1].repeat(batch, *[1] * (x.dim() - 1)).to(device)


def resolve_devices(device: str) -> list[str]:
    """The devices ``device`` names: "auto" is the CPU, and CUDA too when present."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.", "use --device cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine.", "use --device cpu")
    if device == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [device]
