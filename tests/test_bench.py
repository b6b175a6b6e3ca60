"""Latency (cspify.benchmark): tiny models, few runs, no timing assertions (speed targets live in
benchmarks/paper.py)."""

from __future__ import annotations

import json

import pytest
import torch

import cspify
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
    from cspify.bench import BenchRow, Timing, _notes

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)

    steady = Timing(median_ms=100, iqr_ms=2, min_ms=98, runs=9, kernel_share=0.05)
    assert _notes([BenchRow(16, steady, steady)]) == []
    noisy = Timing(median_ms=100, iqr_ms=30, min_ms=80, runs=9, kernel_share=0.05)
    faulting = Timing(median_ms=100, iqr_ms=2, min_ms=98, runs=9, kernel_share=0.4)
    (spread,) = _notes([BenchRow(1, steady, steady), BenchRow(16, steady, noisy)])
    assert "batch size(s) 16" in spread
    (kernel,) = _notes([BenchRow(16, faulting, steady)])
    assert kernel.startswith("40% of the CPU time went to the kernel") and "MALLOC_TRIM_THRESHOLD_" in kernel
    assert _notes([BenchRow(16, faulting, steady, "cuda")]) == []
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    (kernel,) = _notes([BenchRow(16, faulting, steady)])  # the settings are on already: not "rerun with" them
    assert "even with glibc's allocator settings" in kernel and "rerun with" not in kernel
    assert "over 32 MiB afresh on every forward" in kernel


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


