"""cspify.sweep: one conversion and measurement per (gamma, fusion, hidden) point."""

from __future__ import annotations

import importlib

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




# ---------------------------------------------------------------- with data: calibrated, scored, plotted


@pytest.fixture()
def scored(tmp_path, monkeypatch):
    """A 1-channel model of three classes, its file, and IDX data it takes."""
    from test_data import idx_folder
    from test_finetune import NET

    from cspify.data import open_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET.replace("CHANNELS", "1"))
    idx_folder(tmp_path / "data", n_train=32, n_val=12, classes=3)
    namespace = {}
    exec(NET.replace("CHANNELS", "1"), namespace)
    return namespace["Net"]().eval(), open_data(tmp_path / "data")


def test_a_sweep_with_data_calibrates_and_scores_every_point(scored):
    import io

    from cspify.plot import plot_sweep

    model, data = scored
    x = torch.zeros(1, 1, 8, 8)
    result = cspify.sweep(model, x, gammas=(0.25, 0.5), data=data, finetune_epochs=1, batch_size=8)
    assert result.original_top1 is not None and result.stopped is None
    for point in result.points:
        assert 0 <= point.accuracy.top1 <= 1 and 0 <= point.accuracy.agreement <= 1 and point.accuracy.epochs == 1
    assert [p["accuracy"]["finetune_epochs"] for p in result.to_dict()["points"]] == [1, 1]
    assert "top-1" in result.table() and "agreement" in str(result) and "distilled for 1 epoch" in str(result)
    picture = io.BytesIO()
    plot_sweep(result, picture, "png")  # the top-1 against flops panel drawn too
    assert picture.getvalue().startswith(b"\x89PNG")


def _stop_at_the_second_point(monkeypatch) -> None:
    """Ctrl-C while the sweep scores its second point."""
    sweeping = importlib.import_module("cspify.sweep")  # the module: cspify.sweep is the function
    real, calls = sweeping._Scorer.score, []

    def score(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(sweeping._Scorer, "score", score)


def test_a_stopped_sweep_keeps_the_points_done(scored, monkeypatch):
    model, data = scored
    _stop_at_the_second_point(monkeypatch)
    result = cspify.sweep(model, torch.zeros(1, 1, 8, 8), gammas=(0.25, 0.5, 0.75), data=data)
    assert isinstance(result.stopped, KeyboardInterrupt) and [p.gamma for p in result.points] == [0.25]
    assert "stopped after 1 of 3 points" in str(result)


def test_cli_sweep_with_data_writes_the_points_done_when_stopped(scored, monkeypatch):
    import json

    from test_cli import cli

    result = cli("sweep", "net.py:Net", "--data", "data", "--gammas", "0.25,0.5", "--json", "s.json", "-q")
    assert result.exit_code == 0, result.output
    saved = json.loads(open("s.json").read())
    assert saved["original_top1"] is not None and all("accuracy" in p for p in saved["points"])
    _stop_at_the_second_point(monkeypatch)
    stopped = cli("sweep", "net.py:Net", "--data", "data", "--gammas", "0.25,0.5", "--json", "t.json", "-q")
    assert stopped.exit_code == 130 and "interrupted" in stopped.stderr
    saved = json.loads(open("t.json").read())
    assert saved["stopped"] and saved["planned"] == 2 and len(saved["points"]) == 1


def test_finetune_epochs_without_data_is_refused(pair):
    model, _, x = pair
    with pytest.raises(ConfigError, match="finetune_epochs"):
        cspify.sweep(model, x, finetune_epochs=1)
    from test_cli import cli

    refused = cli("sweep", "torchvision:resnet18", "--finetune-epochs", "1")
    assert refused.exit_code != 0 and "--data" in refused.stderr
