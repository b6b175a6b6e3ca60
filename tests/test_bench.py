"""Latency (cspify.benchmark): tiny models, few runs, no timing assertions (speed targets live in
benchmarks/paper.py)."""

from __future__ import annotations

import json

import pytest
import torch

import cspify
from cspify.bench import BenchResult, BenchRow, Load, StageTime, Timing
from cspify.errors import ConfigError

from tiny_models import TinyResNet, seeded


@pytest.fixture(scope="module")
def pair():
    model = seeded(TinyResNet)
    x = torch.randn(1, 3, 16, 16)
    return model, cspify.convert(model, x), x


def test_benchmark_times_both_models_at_each_batch_size(pair):
    model, csp, x = pair
    result = cspify.benchmark(model, csp, x, batch_sizes=(1, 3), threads=1, min_run_time=0.01, rounds=1)
    assert [row.batch_size for row in result.rows] == [1, 3]
    assert result.threads == 1 and result.device == "cpu"
    for row in result.rows:
        assert row.original.median_ms > 0 and row.converted.median_ms > 0 and row.speedup > 0
        assert row.original.iqr_ms >= 0
        for timing in (row.original, row.converted):
            assert 0 < timing.min_ms <= timing.median_ms
        assert row.latency_ratio == pytest.approx(row.converted.median_ms / row.original.median_ms)
        assert row.fastest_ratio == pytest.approx(row.converted.min_ms / row.original.min_ms)
    result.flops = (10, 8)
    assert "flops ratio" in str(result) and "0.800" in str(result)
    assert json.loads(json.dumps(result.to_dict()))["rows"][1]["batch_size"] == 3


def test_notes_flag_spread_and_kernel_time(monkeypatch):
    from cspify.bench import BenchResult, BenchRow, Timing, _kernel_notes

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)

    steady = Timing(median_ms=100, iqr_ms=2, min_ms=98, runs=9, kernel_share=0.05)
    assert BenchResult([BenchRow(16, steady, steady)], "cpu", 1).notes == []
    noisy = Timing(median_ms=100, iqr_ms=30, min_ms=80, runs=9, kernel_share=0.05)
    faulting = Timing(median_ms=100, iqr_ms=2, min_ms=98, runs=9, kernel_share=0.4)
    result = BenchResult([BenchRow(1, steady, steady), BenchRow(16, steady, noisy)], "cpu", 1)
    (spread,) = result.notes
    assert "batch 16: IQR over 10% of the median (original 2%, converted 30%)" in spread
    assert "batch 1:" not in spread and "--threads 1" in spread and "--rounds" in spread
    marked = result.table().splitlines()
    assert "?" not in marked[2] and "1.000?" in marked[3]  # the noisy row's ratios are marked, the steady row's not
    (kernel,) = _kernel_notes([BenchRow(16, faulting, steady)])
    assert kernel.startswith("40% of the CPU time went to the kernel") and "MALLOC_TRIM_THRESHOLD_" in kernel
    assert _kernel_notes([BenchRow(16, faulting, steady, "cuda")]) == []
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    (kernel,) = _kernel_notes([BenchRow(16, faulting, steady)])  # the settings are on already: not "rerun with" them
    assert "even with glibc's allocator settings" in kernel and "rerun with" not in kernel
    assert "over 32 MiB afresh on every forward" in kernel


def _fixed_row(batch, where, models, inputs, threads, min_run_time, rounds, done):
    """Stands in for the timing: fixed figures, and the threads it was asked to time with."""
    _fixed_row.threads.append(threads)
    for _ in range(2 * rounds):
        done(1)
    t = Timing(median_ms=10, iqr_ms=0.1, min_ms=9.9, runs=5)
    return BenchRow(batch, t, t, where)


def test_benchmark_times_with_one_thread_unless_asked_and_states_the_load(pair, monkeypatch):
    model, csp, x = pair
    _fixed_row.threads = []
    monkeypatch.setattr("cspify.bench._time_side_by_side", _fixed_row)
    loads = iter([0.5, 1.5, 0.25, 0.75])
    monkeypatch.setattr("cspify.bench.machine_load", lambda: next(loads))
    monkeypatch.setattr("cspify.bench.cpu_cores", lambda: 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # torch's own setting is not what bench times with
    try:
        result = cspify.benchmark(model, csp, x, batch_sizes=(1, 2))
        asked = cspify.benchmark(model, csp, x, threads=2)
    finally:
        torch.set_num_threads(threads)
    assert _fixed_row.threads == [1, 1, 2] and (result.threads, asked.threads) == (1, 2)
    assert result.load == Load(0.5, 1.5, 4) and asked.load == Load(0.25, 0.75, 4)
    header = str(result).splitlines()[0]
    assert "1 thread(s), load 0.50 before, 1.50 after timing on 4 cores" in header
    assert "load 0.25 before, 0.75 after timing on 4 cores" in asked.to_markdown()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["threads"] == 1 and data["load"] == {"before": 0.5, "after": 1.5, "cores": 4}
    assert data["notes"] == [] and data["rows"][0]["unreliable"] == []
    with pytest.raises(ConfigError, match="threads"):
        cspify.benchmark(model, csp, x, threads=0)  # not "the default" in disguise
    monkeypatch.setattr("cspify.bench.machine_load", lambda: None)  # a platform without a load average
    assert "load unknown, 4 cores" in str(cspify.benchmark(model, csp, x))


def test_a_busy_machine_makes_every_figure_unreliable():
    steady = Timing(median_ms=10, iqr_ms=0.1, min_ms=9.9, runs=9)
    rows = [BenchRow(1, steady, steady), BenchRow(16, steady, steady)]
    assert BenchResult(rows, "cpu", 1, load=Load(0.4, 2.0, 2)).notes == []  # 1.0 of others' load: a core free
    busy = BenchResult(rows, "cpu", 1, load=Load(0.4, 3.1, 2))
    (note,) = busy.notes
    assert "other work (load 3.10 less the 1 timed thread(s)) leaves under 1 of its 2 cores free" in note
    assert all("1.000?" in line for line in busy.table().splitlines()[2:])
    assert busy.to_dict()["rows"][1]["unreliable"] and "note: unreliable figures" in str(busy)
    (note,) = BenchResult(rows, "cpu", 4, load=Load(0.1, 0.2, 2)).notes
    assert "4 threads timed on 2 cores" in note
    on_cuda = [BenchRow(1, steady, steady, "cuda")]  # one host thread launches the kernels
    assert BenchResult(on_cuda, "cuda", 4, load=Load(0.1, 1.2, 2)).notes == []
    assert BenchResult(on_cuda, "cuda", 4, load=Load(0.1, 2.2, 2)).notes != []


def test_figures_the_flops_cannot_support_are_not_printed_as_results():
    """The run issue 23 reports: a 3 ms model timed at 1736 ms with a tiny IQR, and a
    latency saved / flops saved of about -21 printed as a result."""
    fast = Timing(median_ms=3.0, iqr_ms=0.05, min_ms=2.9, runs=9)
    slower = Timing(median_ms=6.2, iqr_ms=0.05, min_ms=6.1, runs=9)
    stalled = Timing(median_ms=1736.0, iqr_ms=4.0, min_ms=1730.0, runs=9)
    flops = (12_500_000, 11_875_000)  # converted / original 0.95
    result = BenchResult([BenchRow(1, fast, slower), BenchRow(2, stalled, stalled)], "cpu", 1, flops=flops,
                         stages=[StageTime("layer1", 10.0, 25.0), StageTime("layer2", 10.0, 9.0)])
    first, second = result.table().splitlines()[2:]
    assert "-21.33" not in result.table() and first.split()[-1] == "?" and "2.067?" in first
    assert "1.000?" in second  # the ratio of two stalled timings is no result either
    (note,) = result.notes
    assert "latency saved / flops saved -21.33 lies outside -1 to 2" in note
    assert "latency ratio 2.067 lies outside 0.2 to 2 (saved -107%, below -100%)" in note
    assert "batch 2: the original median 1736.00 ms is over the 175.0 ms its flops take on a slow core" in note
    assert "stage layer1 saved -150%, below -100%" in note and "layer2" not in note
    assert [line.split()[-1] for line in result.stage_table().splitlines()[2:]] == ["?", "10.0%"]
    assert [s["unreliable"] for s in result.to_dict()["stages"]] == [True, False]
    row = result.to_dict()["rows"][0]
    assert row["saved_per_flops_saved"] == pytest.approx(-21.3333) and len(row["unreliable"]) == 2
    result.flops_scope = "layer1"  # a part's flops bound nothing of the whole model's time
    assert "slow core" not in result.notes[0]
    steady = BenchResult([BenchRow(1, fast, Timing(2.9, 0.05, 2.8, 9))], "cpu", 1, flops=flops)
    assert steady.notes == [] and steady.table().splitlines()[2].split()[-1] == "0.67"
    # steady timings, converted 20% slower for 5% fewer flops: that one quotient is in doubt, not the timings
    slower = BenchResult([BenchRow(1, fast, Timing(3.6, 0.05, 3.5, 9))], "cpu", 1, flops=flops)
    line = slower.table().splitlines()[2].split()
    assert line[-1] == "?" and "1.200" in line and "0.833x" in line
    (note,) = slower.notes
    assert "latency saved / flops saved -4.00 lies outside -1 to 2: the time did not follow the flops" in note


def test_a_starved_timing_thread_is_noted():
    starved = Timing(median_ms=10, iqr_ms=0.1, min_ms=9.9, runs=9, cpu_share=0.4)
    fed = Timing(median_ms=10, iqr_ms=0.1, min_ms=9.9, runs=9, cpu_share=0.98)
    (note,) = BenchResult([BenchRow(1, starved, fed)], "cpu", 1).notes
    assert "got a core for only part of the time (original 40%, converted 98%)" in note
    assert BenchResult([BenchRow(1, fed, fed)], "cpu", 1).notes == []
    assert BenchResult([BenchRow(1, starved, fed)], "cpu", 2).notes == []  # several threads: not judged


def test_benchmark_shows_its_progress_on_stderr_unless_quiet(pair, capsys):
    model, csp, x = pair
    cspify.benchmark(model, csp, x, batch_sizes=(1, 2), min_run_time=0.01, rounds=1, progress=True)
    err = capsys.readouterr().err
    assert "cspify: timing both models" in err and "4/4" in err and "block" in err
    cspify.benchmark(model, csp, x, min_run_time=0.01, rounds=1)
    assert capsys.readouterr().err == ""


def test_auto_device_is_the_cpu_and_cuda_when_present(monkeypatch):
    from cspify.bench import BenchResult, BenchRow, Timing, resolve_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_devices("auto") == ["cpu"]
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_devices("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_devices("auto") == ["cpu", "cuda"] and resolve_devices("cpu") == ["cpu"]

    t = Timing(median_ms=10, iqr_ms=2, min_ms=9, runs=5)
    both = BenchResult([BenchRow(1, t, t, "cpu"), BenchRow(1, t, t, "cuda")], "cpu, cuda", 1)
    assert both.table().splitlines()[0].split()[0] == "device" and "cuda" in both.table()
    one = BenchResult([BenchRow(1, t, t, "cpu")], "cpu", 1)
    assert "device" not in one.table()


def test_benchmark_refuses_bad_options(pair):
    model, csp, x = pair
    with pytest.raises(ConfigError):
        cspify.benchmark(model, csp, x, device="tpu")
    with pytest.raises(ConfigError):
        cspify.benchmark(model, csp, x, batch_sizes=(0,))
    with pytest.raises(ConfigError, match="rounds"):
        cspify.benchmark(model, csp, x, rounds=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            cspify.benchmark(model, csp, x, device="cuda")


