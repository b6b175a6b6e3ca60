"""Choosing stages and options by an objective or a budget (cspify.budget): per-stage options,
a flops budget landing on its target, objective latency and target latency with a fake timer
(deterministic times, so the selection logic is what is tested), and bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.agreement import Evidence, Judged
from cspify.budget import Goal, Search, _pick, _Stage
from cspify.config import CSPConfig
from cspify.errors import ConfigError, NoStageError
from cspify.measure import measure
from cspify.record import conversion_of

from test_cli import cli
from tiny_models import TinyResNet, cbr, seeded

X = torch.randn(1, 3, 16, 16)
QUICK = Search(gammas=(0.25, 0.5, 0.75), min_run_time=0.01, rounds=1)  # 6 options: a few seconds per budget


class ThreeStages(nn.Module):
    """Three residual stages of 16, 32 and 64 channels: enough stages for a budget to land finely."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.stage1 = nn.Sequential(*[_Block(16) for _ in range(3)])
        self.down1 = cbr(16, 32, 3, stride=2)
        self.stage2 = nn.Sequential(*[_Block(32) for _ in range(3)])
        self.down2 = cbr(32, 64, 3, stride=2)
        self.stage3 = nn.Sequential(*[_Block(64) for _ in range(3)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        for layer in (self.stem, self.stage1, self.down1, self.stage2, self.down2, self.stage3, self.head):
            x = layer(x)
        return x


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(cbr(c, c, 1), cbr(c, c, 3, act=False))

    def forward(self, x):
        return torch.relu(x + self.f(x))


@pytest.fixture(scope="module")
def three():
    return seeded(ThreeStages)


def _flops_ratio(model, csp, x=X) -> float:
    return measure(csp, (x,)).totals.flops / measure(model, (x,)).totals.flops


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- per-stage options


def test_per_stage_gamma_and_hidden_plan_that_stage_alone():
    model = seeded(TinyResNet)
    csp = cspify.convert(model, X, config=CSPConfig(stage_gammas={"layer2": 0.75}, stage_hidden={"layer2": "scale"}))
    stages = {s.name: s for s in conversion_of(csp).stages}
    assert (stages["layer1"].gamma, stages["layer1"].hidden, stages["layer1"].bypass_channels) == (0.5, "keep", 4)
    assert (stages["layer2"].gamma, stages["layer2"].hidden, stages["layer2"].bypass_channels) == (0.75, "scale", 12)
    report = cspify.compare(model, csp, X)
    assert report.options["gamma"] == "per stage" and report.options["hidden"] == "per stage"
    assert "gamma hidden" in str(report) and "0.75 scale" in str(report)
    row = report.to_dict()["stages"][1]
    assert (row["gamma"], row["hidden"]) == (0.75, "scale")
    assert csp(X).shape == model(X).shape


def test_per_stage_options_refuse_bad_values_and_unknown_stages():
    with pytest.raises(ConfigError, match="stage 'layer1': gamma must lie strictly between 0 and 1"):
        CSPConfig(stage_gammas={"layer1": 1.0})
    with pytest.raises(ConfigError, match="stage 'layer1': hidden must be one of"):
        CSPConfig(stage_hidden={"layer1": "wide"})
    with pytest.raises(ConfigError, match="more than once"):
        CSPConfig(stage_gammas=(("layer1", 0.3), ("layer1", 0.4)))
    with pytest.raises(ConfigError, match="must map stage names to values"):
        CSPConfig(stage_gammas=0.5)
    with pytest.raises(ConfigError, match="no stage is named 'layer9'") as error:
        cspify.convert(seeded(TinyResNet), X, config=CSPConfig(stage_gammas={"layer9": 0.5}))
    assert "layer1" in error.value.hint


def test_for_stage_gives_the_stage_its_own_options():
    config = CSPConfig(0.5, stage_gammas={"a": 0.25}, stage_hidden={"b": "scale"})
    assert config.for_stage("c") is config
    assert (config.for_stage("a").gamma, config.for_stage("a").hidden) == (0.25, "keep")
    assert (config.for_stage("b").gamma, config.for_stage("b").hidden) == (0.5, "scale")
    assert not config.for_stage("a").per_stage and config.per_stage


# ---------------------------------------------------------------- a flops budget


@pytest.mark.parametrize("target", [0.85, 0.7])
def test_target_flops_lands_within_two_percent(three, target):
    before = _state(three)
    csp = cspify.convert(three, X, target_flops=target, search=QUICK)
    ratio = _flops_ratio(three, csp)
    assert abs(ratio - target) <= 0.02, ratio
    record = conversion_of(csp)
    assert record.targets == (("flops", target),) and record.objective == "flops"
    assert record.config.per_stage and all(s.gamma in QUICK.gammas for s in record.converted)
    assert any(f"flops land at {ratio:.3f}" in note for note in record.notes)
    report = cspify.compare(three, csp, X)
    assert f"target_flops={target:g}" in str(report) and "gamma hidden" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["notes"] == list(record.notes)
    assert all(torch.equal(v, before[k]) for k, v in three.state_dict().items())  # the user's model untouched


def test_target_flops_spreads_the_cut_evenly(three):
    """Objective flops: no stage is cut far harder than the others (each loses a similar share)."""
    search = Search(gammas=(0.25, 0.375, 0.5, 0.625, 0.75), hidden=("scale",))
    csp = cspify.convert(three, X, target_flops=0.58, search=search)
    rows = [r for r in cspify.compare(three, csp, X).stages if r.converted]
    assert len(rows) == 3
    cuts = [1 - r.after.flops / r.before.flops for r in rows]
    assert max(cuts) - min(cuts) < 0.2, cuts


def test_target_flops_out_of_reach_says_how_far_it_goes(three):
    with pytest.raises(ConfigError, match="target_flops 0.05 is out of reach.*leaves 0.") as error:
        cspify.convert(three, X, target_flops=0.05, search=QUICK)
    assert "or more" in error.value.hint


def test_knapsack_picks_the_least_cost_inside_the_window():
    a = _Stage("a", 100, {(0.25, "keep"): 10, (0.5, "keep"): 30, (0.75, "keep"): 60})
    b = _Stage("b", 100, {(0.25, "keep"): 20, (0.5, "keep"): 40})
    even = lambda s, option, saved: saved * saved / s.flops
    assert _pick([a, b], (50, 52), even, lambda s, saved: saved) == {"a": (0.5, "keep"), "b": (0.25, "keep")}  # 30 + 20
    assert _pick([a, b], (0, 1), even, lambda s, saved: saved) == {}
    assert _pick([a, b], (105, 107), even, lambda s, saved: saved) is None  # 100 at most
    # nothing lands in (95, 96) or (101, 102): the nearest sum, 100
    for window in ((95, 96), (101, 102)):
        assert _pick([a, b], window, even, lambda s, saved: saved) == {"a": (0.75, "keep"), "b": (0.5, "keep")}
    # 60 and 70 lie 1 from (61, 69): the one above it, 30 + 40
    assert _pick([a, b], (61, 69), even, lambda s, saved: saved) == {"a": (0.5, "keep"), "b": (0.5, "keep")}


# ---------------------------------------------------------------- objective latency, with a fake timer


class FakeTimer:
    """The original takes 10 ms; each converted stage changes that by ``effect[stage]`` ms,
    scaled by its bypass share where ``reference`` gives the share the effect is for
    (deterministic and additive: the selection logic is what is tested). Both models given
    are timed so; ``calls`` lists the stages converted in each pair."""

    def __init__(self, effect: dict[str, float], reference: dict[str, float] | None = None):
        self.effect, self.reference, self.calls, self.devices = effect, reference or {}, [], set()

    def ms(self, model) -> float:
        record = conversion_of(model)
        ms = 10.0
        for s in record.converted if record else ():
            share = 1.0
            if s.name in self.reference:
                share = s.bypass_channels / s.channels / self.reference[s.name]
            ms += self.effect[s.name] * share
        return ms

    def __call__(self, first, second, inputs, search, device):
        self.devices.add(device)
        self.calls.append(tuple(tuple(s.name for s in (conversion_of(m).converted if conversion_of(m) else ()))
                                for m in (first, second)))
        return self.ms(first), self.ms(second)


def test_objective_latency_converts_only_the_stages_that_pay(three, monkeypatch):
    timer = FakeTimer({"stage1": -1.0, "stage2": 0.5, "stage3": -0.2})
    monkeypatch.setattr("cspify.budget.time_models", timer)
    csp = cspify.convert(three, X, objective="latency", search=QUICK)
    record = conversion_of(csp)
    assert [s.name for s in record.converted] == ["stage1", "stage3"]
    stages = {s.name: s for s in record.stages}
    # each stage timed in the model with all three: without it, then with it (9.3 ms)
    assert (stages["stage1"].time_before_ms, stages["stage1"].time_after_ms) == pytest.approx((10.3, 9.3))
    assert stages["stage2"].time_before_ms == pytest.approx(8.8) and "does not pay in time" in stages["stage2"].reason
    everything = ("stage1", "stage2", "stage3")
    assert timer.calls[:3] == [(("stage2", "stage3"), everything), (("stage1", "stage3"), everything),
                               (("stage1", "stage2"), everything)] and timer.devices == {"cpu"}
    assert record.objective == "latency" and any("2 of 3 stages pay" in n for n in record.notes)
    assert any("the chosen stages together: 8.80 ms" in n for n in record.notes)
    text = str(cspify.compare(three, csp, X))
    assert "model ms" in text and "objective=latency" in text and "9.30" in text


def test_objective_latency_times_each_stage_where_it_runs(three, monkeypatch):
    """A stage that costs time alone but saves it beside the others (its cost shared): timed
    in the model with the others converted, it pays."""

    class Shared(FakeTimer):
        def ms(self, model):  # a fixed 1 ms for converting anything, then 0.6 ms saved per stage
            record = conversion_of(model)
            n = len(record.converted) if record else 0
            return 10.0 + (1.0 - 0.6 * n if n else 0.0)

    monkeypatch.setattr("cspify.budget.time_models", Shared({}))
    csp = cspify.convert(three, X, objective="latency", search=QUICK)
    assert len(conversion_of(csp).converted) == 3


def test_objective_latency_leaves_stages_until_the_model_is_faster_than_the_original(three, monkeypatch):
    """Each stage pays beside the others, but all three together are slower than the
    original: the stage that saved least is left, then the next, until the model is faster."""

    class Table(FakeTimer):
        TIMES = {(): 10.0, ("stage1", "stage2", "stage3"): 10.2, ("stage2", "stage3"): 10.5,
                 ("stage1", "stage3"): 10.3, ("stage1", "stage2"): 10.25, ("stage1",): 9.7}

        def ms(self, model):
            record = conversion_of(model)
            return self.TIMES[tuple(s.name for s in record.converted) if record else ()]

    monkeypatch.setattr("cspify.budget.time_models", Table({}))
    record = conversion_of(cspify.convert(three, X, objective="latency", search=QUICK))
    assert [s.name for s in record.converted] == ["stage1"]
    stages = {s.name: s for s in record.stages}
    for name, ms in (("stage3", "10.20"), ("stage2", "10.25")):
        assert f"the model ran {ms} ms against the original's 10.00 ms" in stages[name].reason
        assert "saved least" in stages[name].reason
    assert [n for n in record.notes if "together" in n][-1] == "the chosen stages together: 9.70 ms against 10.00 ms (0.970) on cpu"
    Table.TIMES[("stage1",)] = 10.1  # and where no subset is faster, it refuses
    with pytest.raises(NoStageError, match="none of the 3 stages that convert makes the model faster"):
        cspify.convert(three, X, objective="latency", search=QUICK)


def test_objective_latency_times_on_cuda_when_present(three, monkeypatch):
    timer = FakeTimer({"stage1": -1.0, "stage2": -1.0, "stage3": -1.0})
    monkeypatch.setattr("cspify.budget.time_models", timer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    csp = cspify.convert(three, X, objective="latency", search=QUICK, stages=["stage1", "stage2"])
    assert timer.devices == {"cuda"}
    assert [s.name for s in conversion_of(csp).converted] == ["stage1", "stage2"]
    assert "on cuda" in " ".join(conversion_of(csp).notes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        cspify.convert(three, X, objective="latency", search=Search(device="cuda"))


def test_objective_latency_refuses_when_no_stage_pays(three, monkeypatch):
    monkeypatch.setattr("cspify.budget.time_models", FakeTimer({"stage1": 0.0, "stage2": 1.0, "stage3": 2.0}))
    with pytest.raises(NoStageError, match="none of the 3 stages that convert makes the model faster on cpu") as error:
        cspify.convert(three, X, objective="latency", search=QUICK)
    assert "stage2: 13.00 ms with it, 12.00 ms without" in error.value.message


def test_target_flops_by_latency_cuts_where_time_is_bought(three, monkeypatch):
    """stage1 buys much time per flop, stage3 little, stage2 none: the cut goes to stage1 first."""
    timer = FakeTimer({"stage1": -3.0, "stage2": 0.5, "stage3": -0.01})
    monkeypatch.setattr("cspify.budget.time_models", timer)
    search = Search(gammas=(0.25, 0.375, 0.5, 0.625, 0.75), hidden=("scale",), min_run_time=0.01, rounds=1)
    csp = cspify.convert(three, X, target_flops=0.75, objective="latency", search=search)
    record = conversion_of(csp)
    stages = {s.name: s for s in record.stages}
    assert "does not pay" in stages["stage2"].reason
    assert [s.name for s in record.converted] == ["stage1"] and stages["stage1"].gamma == 0.625
    assert 0.74 <= _flops_ratio(three, csp) <= 0.75
    assert record.objective == "latency" and "the cut buys the most measured time" in " ".join(record.notes)


def test_target_latency_lands_by_measured_time(three, monkeypatch):
    """Fake time: proportional to the converted model's flops; the target is met by that time."""
    original = measure(three, (X,)).totals.flops

    def by_flops(model, converted, inputs, search, device):
        return 10.0, 10.0 * measure(converted, (X,)).totals.flops / original

    monkeypatch.setattr("cspify.budget.time_models", by_flops)
    csp = cspify.convert(three, X, target_latency=0.8, search=QUICK)
    record = conversion_of(csp)
    assert record.targets == (("latency", 0.8),)
    assert 0.78 <= _flops_ratio(three, csp) <= 0.81
    assert any("target latency 0.8, choice 1" in n for n in record.notes)
    assert all(s.time_before_ms == 10.0 for s in record.converted)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, message", [
    ({"target_flops": 0}, "target_flops must be a fraction of the original strictly between 0 and 1, got 0"),
    ({"target_flops": 1.2}, "strictly between 0 and 1, got 1.2"),
    ({"target_flops": "most"}, "got 'most'"),
    ({"target_latency": -0.5}, "target_latency must be a fraction"),
    ({"target_flops": 0.7, "target_latency": 0.8}, "one target"),
    ({"objective": "speed"}, "objective must be one of flops, latency, got 'speed'"),
])
def test_bad_goals_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        cspify.convert(seeded(TinyResNet), X, **kwargs)
    assert error.value.hint


@pytest.mark.parametrize("kwargs, message", [
    ({"gammas": ()}, "at least one gamma"),
    ({"gammas": (0.5, 1.5)}, "gamma must lie strictly between 0 and 1"),
    ({"hidden": ("wide",)}, "hidden must be one of"),
    ({"tolerance": 0}, "tolerance must lie between 0 and 0.5"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"rounds": 0}, "positive integers"),
    ({"min_run_time": 0}, "min_run_time must be positive"),
])
def test_bad_searches_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Search(**kwargs)


def test_a_budget_takes_no_stage_options_of_its_own():
    config = CSPConfig(stage_gammas={"layer1": 0.25})
    with pytest.raises(ConfigError, match="cannot take stage_gammas or stage_hidden too"):
        cspify.convert(seeded(TinyResNet), X, config=config, target_flops=0.8)


def test_goal_properties():
    assert not Goal().active and Goal("latency").timed and Goal(target_latency=0.5).timed
    assert Goal(target_flops=0.7).active and not Goal(target_flops=0.7).timed
    assert Goal(target_flops="0.7").targets == (("flops", 0.7),)


# ---------------------------------------------------------------- the command line


def test_cli_target_flops_reports_the_choice(tmp_path):
    result = cli("analyze", "examples/resnet_like.py", "--input-shape", "1,3,32,32", "--target-flops", "0.8", "-q",
                 "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "target_flops=0.8" in result.output and "gamma hidden" in result.output
    assert "flops land at" in result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["options"]["target_flops"] == 0.8 and 0.78 <= 1 - saved["saved_percent"]["flops"] / 100 <= 0.8


def test_cli_objective_latency_with_a_fake_timer(monkeypatch):
    monkeypatch.setattr("cspify.budget.time_models", lambda m, c, i, s, d: (10.0, 9.0))
    result = cli("analyze", "examples/resnet_like.py", "--input-shape", "1,3,32,32", "--objective", "latency", "-q")
    assert result.exit_code == 0, result.output
    assert "model ms" in result.output and "objective=latency" in result.output


@pytest.mark.parametrize("args, message", [
    (["--target-flops", "abc"], "error: target_flops must be a fraction"),
    (["--target-latency", "1"], "error: target_latency must be a fraction"),
    (["--target-flops", "0.7", "--target-latency", "0.8"], "error: a conversion takes one target"),
])
def test_cli_refuses_bad_targets_before_loading(args, message):
    result = cli("analyze", "does_not_exist.py", *args)
    assert result.exit_code == 2 and message in result.stderr and "hint:" in result.stderr


def test_cli_objective_choice_is_checked():
    result = cli("analyze", "examples/resnet_like.py", "--objective", "speed")
    assert result.exit_code == 2 and "speed" in result.output + result.stderr


def test_a_budget_falls_back_to_fvcore_where_the_estimate_misses(three, monkeypatch):
    """An estimate that halves every saving would land far off: fvcore's counts take over."""
    from cspify import api

    real = api._Pipeline.estimate

    def halved(self, config):
        return {name: (before, before - (before - after) // 2) for name, (before, after) in real(self, config).items()}

    monkeypatch.setattr(api._Pipeline, "estimate", halved)
    csp = cspify.convert(three, X, target_flops=0.7, search=QUICK)
    assert abs(_flops_ratio(three, csp) - 0.7) <= 0.02
    assert any("missed fvcore's count" in note for note in conversion_of(csp).notes)


def test_bench_shows_the_stage_times_the_objective_measured(three, monkeypatch):
    monkeypatch.setattr("cspify.budget.time_models", FakeTimer({"stage1": -1.0, "stage2": -0.5, "stage3": 1.0}))
    csp = cspify.convert(three, X, objective="latency", search=QUICK)
    result = cspify.benchmark(three, csp, X, threads=1, min_run_time=0.01, rounds=1)
    assert [s.name for s in result.stages] == ["stage1", "stage2", "stage3"]
    assert [(s.without_ms, s.with_ms) for s in result.stages] == [
        pytest.approx((10.5, 9.5)), pytest.approx((10.0, 9.5)), pytest.approx((8.5, 9.5))]
    assert "per stage, as the latency objective timed it" in str(result)
    assert json.loads(json.dumps(result.to_dict()))["stages"][0]["saved"] == pytest.approx(0.0952, abs=1e-4)
    assert "### Per stage" in result.to_markdown()
    plain = cspify.benchmark(three, cspify.convert(three, X), X, threads=1, min_run_time=0.01, rounds=1)
    assert plain.stages == [] and "per stage" not in str(plain)


def test_objective_latency_times_folded_models_where_asked(three, monkeypatch):
    """Search(fold=True): both models of every pair timed with their norms folded into the
    convs (as --inference saves them), the converted ones still carrying their record."""
    timer = FakeTimer({"stage1": -1.0, "stage2": -0.5, "stage3": -0.2})
    timed = []

    def folded_only(first, second, inputs, search, device):
        timed.extend((first, second))
        return timer(first, second, inputs, search, device)

    monkeypatch.setattr("cspify.budget.time_models", folded_only)
    csp = cspify.convert(three.train(), X, objective="latency", search=replace(QUICK, fold=True))
    three.eval()
    assert len(conversion_of(csp).converted) == 3 and csp.training  # the model returned is not folded
    assert timed and not any(isinstance(m, nn.BatchNorm2d) for model in timed for m in model.modules())
    assert not any(model.training for model in timed)


def test_cli_convert_inference_times_stages_folded(tmp_path, monkeypatch):
    searches = []
    monkeypatch.setattr("cspify.budget.time_models", lambda m, c, i, s, d: searches.append(s) or (10.0, 9.0))
    result = cli("convert", "examples/resnet_like.py", "--input-shape", "1,3,32,32", "--objective", "latency",
                 "--inference", "-o", tmp_path / "csp.pt", "-q")
    assert result.exit_code == 0, result.output
    assert searches and all(s.fold for s in searches)
    searches.clear()
    assert cli("analyze", "examples/resnet_like.py", "--input-shape", "1,3,32,32", "--objective", "latency",
               "-q").exit_code == 0
    assert searches and not any(s.fold for s in searches)


def test_cli_bench_with_objective_latency_prints_the_stage_times(monkeypatch):
    searches = []
    monkeypatch.setattr("cspify.budget.time_models", lambda m, c, i, s, d: searches.append((s, d)) or (10.0, 9.0))
    result = cli("bench", "examples/resnet_like.py", "--input-shape", "1,3,32,32", "--objective", "latency",
                 "--batch-sizes", "2,4", "--min-run-time", "0.01", "--rounds", "1", "--threads", "1", "--device", "cpu",
                 "-q")
    assert result.exit_code == 0, result.output
    assert "per stage, as the latency objective timed it" in result.output and "stages.1" in result.output
    # the stages are timed as bench times the models: its threads, device, run time, rounds, first batch size
    search, device = searches[0]
    assert (search.batch_size, search.threads, search.min_run_time, search.rounds, device) == (2, 1, 0.01, 1, "cpu")


class _GroupedBlock(nn.Module):
    """x + f(x) where a grouped conv reads the stream: a stage no gamma converts."""

    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=4), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.f(x))


def test_stages_no_option_converts_keep_their_own_reason(three, monkeypatch):
    """A stage the choice never picks says why it converts at no option, not that a filter
    left it: under a budget, and under objective latency."""
    model = seeded(nn.Sequential, cbr(3, 16, 3), *[_GroupedBlock(16) for _ in range(3)], cbr(16, 32, 3, stride=2),
                   *[_Block(32) for _ in range(3)])
    record = conversion_of(cspify.convert(model, X, target_flops=0.9, search=QUICK))
    left = [s for s in record.stages if not s.converted and "grouped conv" in s.reason]
    assert left and left[0].reason.startswith("it saves flops at no option searched (at gamma 0.5, hidden keep: "
                                              "grouped conv")
    monkeypatch.setattr("cspify.budget.time_models", lambda m, c, i, s, d: (10.0, 9.0))
    record = conversion_of(cspify.convert(model, X, objective="latency", search=QUICK))
    assert record.converted and not any(s.reason == "not selected by the stage filter" for s in record.stages)
    assert any(s.reason.startswith("grouped conv") for s in record.stages if not s.converted)


def test_stages_a_budget_leaves_say_so(three):
    csp = cspify.convert(three, X, target_flops=0.93, search=QUICK)
    record = conversion_of(csp)
    assert len(record.converted) == 1
    left = [s for s in record.stages if not s.converted]
    assert left and all(s.reason.startswith("the budget left it whole") for s in left)
    assert "the budget left it whole" in str(cspify.compare(three, csp, X))


def test_the_record_carries_what_each_stage_narrowed(three):
    """Calibration reads the narrowings from the record: each stage's, planned with its own options."""
    from cspify import rules
    from cspify.plan import plan_stage
    from cspify.trace import trace

    csp = cspify.convert(three, X, config=CSPConfig(stage_gammas={"stage1": 0.75}, stage_hidden={"stage2": "scale"}))
    record = conversion_of(csp)
    traced = trace(three, X)
    for stage in rules.find_stages(traced, record.config.kinds):
        plan = plan_stage(traced, stage, record.config)
        saved = next(s for s in record.stages if s.name == plan.name)
        assert saved.narrowings == plan.narrowings and saved.gamma == plan.gamma
        assert saved.narrowings and saved.narrowing(saved.narrowings[0].node) == saved.narrowings[0]
    assert record.stages[0].narrowing("no such node") is None
    cspify.calibrate(three, csp, torch.randn(72, 3, 16, 16))


# ---------------------------------------------------------------- a budget that reads accuracy

IMAGES = torch.randn(112, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # 75 fit the head's 65 unknowns


def _cuts(model, csp) -> dict[str, float]:
    return {r.name: 1 - r.after.flops / r.before.flops for r in cspify.compare(model, csp, X).stages if r.converted}


def test_a_budget_with_images_cuts_where_the_model_loses_least(three, monkeypatch):
    """Judged losses that make stage1 costly to cut: the budget cuts it less than the even
    cut does, and says per stage what it measured (a fake judge: the choice is what is tested)."""
    weight = {"stage1": 100.0, "stage2": 0.01, "stage3": 0.01}

    def judge(self, original, converted, calibrated=False):
        record = conversion_of(converted)
        return Judged(sum(weight[s.name] * s.bypass_channels / s.channels for s in record.converted), 0.9, "KL")

    monkeypatch.setattr(Evidence, "judge", judge)
    even = cspify.convert(three, X, target_flops=0.75, search=QUICK)
    measured = cspify.convert(three, X, target_flops=0.75, search=QUICK, data=IMAGES)
    assert abs(_flops_ratio(three, measured) - 0.75) <= 0.02
    assert _cuts(three, measured).get("stage1", 0.0) < _cuts(three, even)["stage1"]
    record = conversion_of(measured)
    assert any("loses least by KL" in note and "held-out images" in note for note in record.notes)
    assert any(note.startswith("the model chosen, calibrated: KL") for note in record.notes)
    for stage in record.converted:
        assert any("alone and calibrated measured KL" in note for note in stage.notes)


def test_evidence_judges_a_classifier_by_kl_and_agreement(three):
    csp = cspify.convert(three, X)
    judged = Evidence(IMAGES).judge(three, csp)
    assert judged.measure == "KL" and judged.loss >= 0 and 0 <= judged.agreement <= 1
    assert Evidence(IMAGES).judge(three, three, calibrated=True).loss == pytest.approx(0, abs=1e-6)
    assert Evidence(IMAGES).judge(three, three, calibrated=True).agreement == 1


def test_too_few_images_for_a_budget_say_how_many_it_needs(three):
    with pytest.raises(ConfigError, match="at least 64 images.*has 10"):
        cspify.convert(three, X, target_flops=0.75, search=QUICK, data=IMAGES[:10])
