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
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tabulate import tabulate

from cspify.errors import ConfigError
from cspify.record import conversion_of
from cspify.trace import as_inputs

DEVICES = ("auto", "cpu", "cuda")  # auto: the CPU, and CUDA too when present
KERNEL_SHARE_NOTE = 0.2
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

    @property
    def spread(self) -> float:
        """IQR over median: above 0.10 the machine was busy while this was timed."""
        return self.iqr_ms / self.median_ms


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
    """Timings of both models per batch size; ``flops`` (original, converted) when known;
    ``stages``: per stage, the times the conversion's latency objective measured."""

    rows: list[BenchRow]
    device: str
    threads: int
    flops: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    stages: list[StageTime] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "threads": self.threads,
            "torch": torch.__version__,
            "flops": list(self.flops) if self.flops else None,
            "rows": [
                {**asdict(row), **{key: round(getattr(row, key), 4)
                                   for key in ("latency_ratio", "fastest_ratio", "speedup", "latency_saved")}}
                for row in self.rows
            ],
            "stages": [{**asdict(s), "saved": round(s.saved, 4)} for s in self.stages],
        }

    def table(self, fmt: str = "simple") -> str:
        several = len({row.device for row in self.rows}) > 1
        headers = ["device"] * several + ["batch", "original ms", "IQR", "min", "converted ms", "IQR", "min",
                                          "latency ratio", "of fastest", "speed-up"]
        if self.flops:
            headers += ["flops ratio", "latency saved / flops saved"]
        rows = []
        for row in self.rows:
            line = [row.device] * several + [row.batch_size]
            for t in (row.original, row.converted):
                line += [f"{t.median_ms:.2f}", f"{t.iqr_ms:.2f}", f"{t.min_ms:.2f}"]
            line += [f"{row.latency_ratio:.3f}", f"{row.fastest_ratio:.3f}", f"{row.speedup:.3f}x"]
            if self.flops:
                ratio = self.flops[1] / self.flops[0]
                line += [f"{ratio:.3f}", f"{row.latency_saved / (1 - ratio):.2f}" if ratio < 1 else "-"]
            rows.append(line)
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                        colalign=("right",) * len(headers))

    def stage_table(self, fmt: str = "simple") -> str:
        """Per stage: the whole model's ms without that stage and with it."""
        rows = [[s.name, f"{s.without_ms:.2f}", f"{s.with_ms:.2f}", f"{100 * s.saved:.1f}%"] for s in self.stages]
        return tabulate(rows, headers=["stage", "model ms without it", "with it", "saved"], tablefmt=fmt,
                        disable_numparse=True, colalign=("left", "right", "right", "right"))

    def __str__(self) -> str:
        runs = min((t.runs for row in self.rows for t in (row.original, row.converted)), default=0)
        parts = [f"latency on {self.device}, {self.threads} thread(s), torch {torch.__version__} "
                 f"(at least {runs} timed blocks per model, the models alternating)",
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
        text = f"## Latency ({self.device}, {self.threads} threads)\n\n{self.table('github')}\n"
        if self.stages:
            text += f"\n### Per stage, as the latency objective timed it\n\n{self.stage_table('github')}\n"
        return text


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
) -> BenchResult:
    """Time both models at each batch size, side by side; the models are not modified.

    ``device`` is "cpu", "cuda", or "auto" (the CPU, and CUDA too when present);
    ``threads`` defaults to ``torch.get_num_threads()``; ``min_run_time`` is the seconds
    each ``blocked_autorange`` runs per model and round (lower it for quick looks);
    ``rounds`` how often the two models take turns.
    """
    devices = resolve_devices(device)
    threads = int(threads or torch.get_num_threads())
    if threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads}.", "pass --threads 1 or more")
    if rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds}.", "pass --rounds 1 or more")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}.",
                          "write them as --batch-sizes 1,16")
    inputs = as_inputs(example_inputs)
    rows = []
    for where in devices:
        models = {name: copy.deepcopy(m).eval().to(where) for name, m in (("original", original),
                                                                          ("converted", converted))}
        for batch in sizes:
            batch_inputs = tuple(_batched(x, batch, where) for x in inputs)
            rows.append(_time_side_by_side(batch, where, models, batch_inputs, threads, min_run_time, rounds))
    return BenchResult(rows, ", ".join(devices), threads, notes=_notes(rows), stages=_stage_times(converted))


def _stage_times(converted: nn.Module) -> list[StageTime]:
    """The per-stage times a latency objective left in the conversion record, if any."""
    record = conversion_of(converted)
    if record is None:
        record = next((conversion_of(m) for m in converted.modules() if conversion_of(m) is not None), None)
    return [StageTime(s.name, s.time_before_ms, s.time_after_ms) for s in (record.stages if record else ())
            if s.time_before_ms is not None and s.time_after_ms is not None]


def _notes(rows: list[BenchRow]) -> list[str]:
    """What a reader should know before trusting these timings."""
    notes = []
    several = len({row.device for row in rows}) > 1
    noisy = [f"{row.batch_size} ({row.device})" if several else str(row.batch_size)
             for row in rows if max(row.original.spread, row.converted.spread) > 0.10]
    if noisy:
        notes.append(
            f"timings spread by over 10% of their median at batch size(s) {', '.join(noisy)}: the machine "
            "was busy; rerun on a quiet machine or with more --rounds")
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
                       rounds: int) -> BenchRow:
    tbench = _timer_module()
    timers = {
        name: tbench.Timer(
            stmt="model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=threads,
            label="cspify", description=name,
        )
        for name, model in models.items()
    }
    measured = {name: [] for name in models}
    cpu = {name: [0.0, 0.0] for name in models}  # user, system seconds
    order = list(timers)
    with torch.inference_mode():
        for timer in timers.values():  # warm-up: allocator, kernels, caches
            timer.timeit(3)
        for _ in range(rounds):
            for name in order:
                before = os.times()
                measured[name].append(timers[name].blocked_autorange(min_run_time=min_run_time))
                after = os.times()
                cpu[name][0] += after.user - before.user
                cpu[name][1] += after.system - before.system
            order.reverse()  # each model goes first in every other round
    timing = {}
    for name, parts in measured.items():
        merged = tbench.Measurement.merge(parts)[0]
        user, system = cpu[name]
        timing[name] = Timing(merged.median * 1e3, merged.iqr * 1e3, min(merged.times) * 1e3, len(merged.times),
                              system / (user + system) if user + system > 0 else 0.0)
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
