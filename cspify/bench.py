"""Measured latency: the original and the converted model timed side by side in one run.

    result = benchmark(model, csp, torch.randn(1, 3, 224, 224), batch_sizes=(1, 16))
    print(result)              # median ms and IQR of both, the speed-up, per batch size
    result.rows[0].speedup     # original median / converted median
    result.to_dict()

Timing uses ``torch.utils.benchmark.Timer`` (warm-up, then ``blocked_autorange``) in
eval mode under ``torch.inference_mode``. The two models alternate, ``rounds`` times,
and each one's measurements are merged, so a burst of load on a shared machine hits
both alike. The example input's first sample is repeated to each batch size. On CUDA,
the Timer synchronizes the device around each measurement.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tabulate import tabulate

# torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA toolkit on CPU machines.
_cpp_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_log.level
_cpp_log.setLevel(logging.ERROR)
from torch.utils import benchmark as tbench  # noqa: E402

_cpp_log.setLevel(_level)

from cspify.errors import ConfigError
from cspify.trace import as_inputs

DEVICES = ("cpu", "cuda")


@dataclass
class Timing:
    """One model at one batch size: median and interquartile range in milliseconds."""

    median_ms: float
    iqr_ms: float
    runs: int


@dataclass
class BenchRow:
    batch_size: int
    original: Timing
    converted: Timing

    @property
    def speedup(self) -> float:
        """Original latency over converted latency (above 1: the converted model is faster)."""
        return self.original.median_ms / self.converted.median_ms

    @property
    def latency_saved(self) -> float:
        """Fraction of the original latency the conversion saved."""
        return 1.0 - self.converted.median_ms / self.original.median_ms


@dataclass
class BenchResult:
    """Timings of both models per batch size; ``flops`` (original, converted) when known."""

    rows: list[BenchRow]
    device: str
    threads: int
    flops: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "threads": self.threads,
            "torch": torch.__version__,
            "flops": list(self.flops) if self.flops else None,
            "rows": [
                {**asdict(row), "speedup": round(row.speedup, 4), "latency_saved": round(row.latency_saved, 4)}
                for row in self.rows
            ],
        }

    def table(self, fmt: str = "simple") -> str:
        headers = ["batch", "original ms", "IQR", "converted ms", "IQR", "speed-up"]
        if self.flops:
            headers += ["flops ratio", "latency saved / flops saved"]
        rows = []
        for row in self.rows:
            line = [row.batch_size, f"{row.original.median_ms:.2f}", f"{row.original.iqr_ms:.2f}",
                    f"{row.converted.median_ms:.2f}", f"{row.converted.iqr_ms:.2f}", f"{row.speedup:.3f}x"]
            if self.flops:
                ratio = self.flops[1] / self.flops[0]
                line += [f"{ratio:.3f}", f"{row.latency_saved / (1 - ratio):.2f}" if ratio < 1 else "-"]
            rows.append(line)
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                        colalign=("right",) * len(headers))

    def __str__(self) -> str:
        runs = min((t.runs for row in self.rows for t in (row.original, row.converted)), default=0)
        parts = [f"latency on {self.device}, {self.threads} thread(s), torch {torch.__version__} "
                 f"(median of at least {runs} timed blocks per model, the models alternating)", "", self.table()]
        if self.flops:
            parts += ["", "(flops ratio = converted / original fvcore flops; latency saved / flops saved: "
                          "1.0 means the time fell as much as the flops)"]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        return f"## Latency ({self.device}, {self.threads} threads)\n\n{self.table('github')}\n"


def benchmark(
    original: nn.Module,
    converted: nn.Module,
    example_inputs,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    device: str = "cpu",
    *,
    min_run_time: float = 1.0,
    rounds: int = 3,
) -> BenchResult:
    """Time both models at each batch size, side by side; the models are not modified.

    ``threads`` defaults to ``torch.get_num_threads()``; ``min_run_time`` is the seconds
    each ``blocked_autorange`` runs per model and round (lower it for quick looks).
    """
    device = _check_device(device)
    threads = int(threads or torch.get_num_threads())
    if threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads}.", "pass --threads 1 or more")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}.",
                          "write them as --batch-sizes 1,16")
    models = {name: copy.deepcopy(m).eval().to(device) for name, m in (("original", original), ("converted", converted))}
    inputs = as_inputs(example_inputs)
    rows = []
    for batch in sizes:
        batch_inputs = tuple(_batched(x, batch, device) for x in inputs)
        timings = _time_side_by_side(models, batch_inputs, threads, min_run_time, rounds)
        rows.append(BenchRow(batch, timings["original"], timings["converted"]))
    return BenchResult(rows, device, threads)


def _time_side_by_side(models: dict, inputs: tuple, threads: int, min_run_time: float, rounds: int) -> dict:
    timers = {
        name: tbench.Timer(
            stmt="model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=threads,
            label="cspify", description=name,
        )
        for name, model in models.items()
    }
    measured = {name: [] for name in models}
    with torch.inference_mode():
        for timer in timers.values():  # warm-up: allocator, kernels, caches
            timer.timeit(3)
        for _ in range(max(1, rounds)):
            for name, timer in timers.items():
                measured[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    result = {}
    for name, parts in measured.items():
        merged = tbench.Measurement.merge(parts)[0]
        result[name] = Timing(merged.median * 1e3, merged.iqr * 1e3, len(merged.times))
    return result


def _batched(x, batch: int, device: str):
    """The example input's first sample repeated ``batch`` times, on ``device``."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x[:1].repeat(batch, *[1] * (x.dim() - 1)).to(device)


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.", "use --device cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine.", "use --device cpu")
    return device
