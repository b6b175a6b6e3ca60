"""cspify.sweep: one conversion and measurement per (gamma, fusion, hidden) point."""

from __future__ import annotations

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


def test_one_point_per_combination_with_its_own_figures(pair):
    model, _, x = pair
    result = cspify.sweep(model, x, gammas=(0.25, 0.75), fusions=("last", "first"), hiddens=("keep", "scale"))
    assert [(p.gamma, p.fusion, p.hidden) for p in result.points] == [
        (g, f, h) for g in (0.25, 0.75) for f in ("last", "first") for h in ("keep", "scale")]
    for point in result.points:
        alone = cspify.compare(model, cspify.convert(model, x, point.gamma, fusion=point.fusion, hidden=point.hidden), x)
        assert point.figures.flops == alone.converted.flops
        assert (point.stages_converted, point.stages_found) == (
            sum(r.converted for r in alone.stages), len(alone.stages))
    assert result.original.flops == alone.original.flops
    by = {(p.gamma, p.hidden): p.figures.flops for p in result.points if p.fusion == "last"}
    assert by[0.75, "keep"] < by[0.25, "keep"] and by[0.75, "scale"] < by[0.75, "keep"]


def test_a_point_that_converts_nothing_says_why_and_the_sweep_goes_on(pair):
    model, _, x = pair
    result = cspify.sweep(model, x, gammas=(0.5,), stages=["layer2"])
    assert result.points[0].stages_converted == 1
    tiny = cspify.sweep(model, x, gammas=(0.01, 0.5))
    assert tiny.points[0].figures is None and "can be converted" in tiny.points[0].reason
    assert tiny.points[1].figures is not None
    assert "gamma 0.01" in str(tiny)


def test_sweep_with_latency_in_the_api(pair):
    model, _, x = pair
    result = cspify.sweep(model, x, gammas=(0.5,), latency=True, threads=1, min_run_time=0.01)
    assert len(result.points) == 1 and result.points[0].latency[0].converted.median_ms > 0
    assert "ms @1" in str(result)


def test_sweep_times_on_one_device(pair):
    model, _, x = pair
    with pytest.raises(ConfigError, match="one device"):
        cspify.sweep(model, x, gammas=(0.5,), latency=True, device="auto")


