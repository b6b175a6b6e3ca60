"""Choosing which stages to convert, and each one's options, by an objective or a budget.

    csp = cspify.convert(model, x, objective="latency")      # only the stages that pay in measured time
    csp = cspify.convert(model, x, target_flops=0.7)         # per-stage gamma and hidden: 70% of the flops
    csp = cspify.convert(model, x, target_flops=0.7, objective="latency")   # the cuts that buy the most time
    csp = cspify.convert(model, x, target_latency=0.8)       # 80% of the measured time
    conversion_of(csp).notes                                 # what was measured and chosen

``objective="latency"``: every stage that converts at the given options is timed on the
target device (CUDA when present, else the CPU; ``Search.device``) where it will run: the
model with every such stage converted against the model with that one left whole, side by
side (``cspify.benchmark``); a stage is converted only where the model runs faster with it.
(Timed alone against the original, stages do not add up: ``benchmarks/stage_times.py``.)
The stages that pay are then timed together against the original; where that model is not
faster, the stage that saved least is left and the rest timed again, so the model returned
is faster than the original where it was timed, or refused.
The record keeps each stage's two times (``StageRecord.time_before_ms``: without it,
``time_after_ms``: with it).

``target_flops=T``: every stage's flops saved at every option of a grid (``Search.gammas``
x ``Search.hidden``: gamma 0.125 to 0.75, inner widths kept or scaled) come from the
planner's estimate (``cspify.plan.stage_flops``: every stage planned at every option on one
trace, nothing rewritten; it counts as fvcore does). A stage's conversion changes only its
own nodes, so savings add up across stages. Then one option per stage (or none) is chosen
so that the whole model lands at T of the original's fvcore flops, at most ``tolerance``
below it (where no choice does, as near it as the grid allows), and the cut costs least: with objective flops, the cut is spread evenly (the
cost of cutting a fraction r of a stage's F flops is F r^2, least where every stage loses
about the same share of its flops, as one global gamma does); with objective latency, the
cut buys the most measured time (each stage's time saved per flop saved, measured once at
the given options, scales its flops saved at every option; stages that do not pay in time
are left). The choice is a knapsack over stages, on flops saved in steps of a twentieth of
the tolerance. The result is converted and counted by fvcore; where that count misses the estimate (ops the
planner does not count), every option is converted and counted by fvcore instead, and the
choice made again on those counts.

``target_latency=T``: stages are timed as for objective latency, options chosen by the
even cut so that the predicted time saved reaches (1 - T) of the original's time, and the
result timed; where it misses T by more than the tolerance, the prediction is corrected by
what was measured and the choice made again (twice at most). The measured ratio is reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn as nn

from tqdm.auto import tqdm

from cspify import bench
from cspify.agreement import Evidence, Judged
from cspify.config import HIDDEN, CSPConfig
from cspify.errors import ConfigError, NoStageError
from cspify.fuse import fuse_for_inference
from cspify.plan import NOT_SELECTED
from cspify.record import Conversion, attach, conversion_of
from cspify.report import Report

OBJECTIVES = ("flops", "latency")
GAMMAS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


@dataclass(frozen=True)
class Goal:
    """What to choose stages and options for, validated once.

    objective:      "flops" (what fvcore counts) or "latency" (what the target device measures).
    target_flops:   the fraction of the original's flops to land at (0 < T < 1), or None.
    target_latency: the fraction of the original's measured time to land at, or None.
    """

    objective: str = "flops"
    target_flops: float | None = None
    target_latency: float | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.",
                              "flops counts multiply-adds; latency times each stage on the target device")
        for name in ("target_flops", "target_latency"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _fraction(value, name))
        if self.target_flops is not None and self.target_latency is not None:
            raise ConfigError("a conversion takes one target, got target_flops and target_latency.",
                              "give --target-flops or --target-latency")

    @property
    def active(self) -> bool:
        """Whether anything is left to choose (the default converts every stage at the given options)."""
        return self.objective != "flops" or self.target_flops is not None or self.target_latency is not None

    @property
    def timed(self) -> bool:
        return self.objective == "latency" or self.target_latency is not None

    @property
    def targets(self) -> tuple[tuple[str, float], ...]:
        return tuple((what, value) for what, value in (("flops", self.target_flops),
                                                        ("latency", self.target_latency)) if value is not None)


@dataclass(frozen=True)
class Search:
    """Where a budget looks, and how stages are timed.

    gammas, hidden: the options each stage may take (every gamma with every hidden).
    tolerance:      how far below a target the model may land (a fraction of the original).
    device:         "auto" (CUDA when present, else the CPU), "cpu" or "cuda".
    batch_size, threads, min_run_time, rounds: as ``cspify.benchmark`` takes them.
    fold:           time both models with each norm folded into the conv before it, in eval
                    mode (``cspify.fuse_for_inference``), as ``convert --inference`` saves them.
    """

    gammas: tuple[float, ...] = GAMMAS
    hidden: tuple[str, ...] = HIDDEN
    tolerance: float = 0.01
    device: str = "auto"
    batch_size: int = 1
    threads: int | None = None
    min_run_time: float = 0.5
    rounds: int = 5
    fold: bool = False

    def __post_init__(self) -> None:
        gammas = tuple(self.gammas) if not isinstance(self.gammas, (int, float, str)) else (self.gammas,)
        object.__setattr__(self, "gammas", tuple(sorted({CSPConfig(g).gamma for g in gammas})))
        hidden = (self.hidden,) if isinstance(self.hidden, str) else tuple(self.hidden)
        object.__setattr__(self, "hidden", tuple(CSPConfig(hidden=h).hidden for h in dict.fromkeys(hidden)))
        if not self.gammas or not self.hidden:
            raise ConfigError("a budget needs at least one gamma and one hidden choice to search.",
                              f"for example gammas={GAMMAS} and hidden={HIDDEN}")
        if not 0 < self.tolerance < 0.5:
            raise ConfigError(f"tolerance must lie between 0 and 0.5, got {self.tolerance}.",
                              "it is how far below the target the model may land, 0.01 by default")
        if self.device not in bench.DEVICES:
            raise ConfigError(f"device must be one of {', '.join(bench.DEVICES)}, got {self.device!r}.",
                              "auto times on CUDA when present, else on the CPU")
        if int(self.batch_size) < 1 or (self.threads is not None and int(self.threads) < 1) or int(self.rounds) < 1:
            raise ConfigError("batch_size, threads and rounds must be positive integers.",
                              "for example batch_size=1, rounds=3")
        if not self.min_run_time > 0:
            raise ConfigError(f"min_run_time must be positive, got {self.min_run_time}.", "for example 0.5 seconds")

    @property
    def options(self) -> list[tuple[float, str]]:
        return [(g, h) for h in self.hidden for g in self.gammas]


def _fraction(value, name: str) -> float:
    """A target as a fraction strictly between 0 and 1, or a ConfigError naming it."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"{name} must be a fraction of the original strictly between 0 and 1, got {value!r}.",
            f"for example --{name.replace('_', '-')} 0.7 keeps 70% of the original's "
            f"{'flops' if name == 'target_flops' else 'measured time'}",
        )
    return fraction


def target_device(search: Search) -> str:
    """The one device stages are timed on: ``search.device``, with "auto" CUDA when present."""
    if search.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return bench.resolve_devices(search.device)[0]


def time_models(original: nn.Module, converted: nn.Module, inputs: tuple, search: Search,
                device: str) -> tuple[float, float]:
    """Median ms of the original and the converted model, timed side by side (``cspify.benchmark``)."""
    row = bench.benchmark(original, converted, inputs, (search.batch_size,), search.threads, device,
                          min_run_time=search.min_run_time, rounds=search.rounds).rows[0]
    return row.original.median_ms, row.converted.median_ms


# ---------------------------------------------------------------------------------------
# The walk


class Pipeline(Protocol):
    """What the walk asks of the api: the model converted with a config, a converted model's
    report against the original, the original's fvcore flops, and the planner's estimate of
    each stage's flops (before, after) for the stages a config converts."""

    def convert(self, config: CSPConfig) -> nn.Module: ...

    def report(self, converted: nn.Module) -> Report: ...

    def original_flops(self) -> int: ...

    def estimate(self, config: CSPConfig) -> dict[str, tuple[int, int]]: ...

    evidence: Evidence | None  # images to judge options on (a budget that reads accuracy), or None


@dataclass
class _Stage:
    """What one stage saves at each option it converts at: {(gamma, hidden): flops saved}."""

    name: str
    flops: int                                   # the stage's flops in the original
    saved: dict[tuple[float, str], int]
    per_flop_ms: float | None = None             # measured ms saved per flop saved (timed objectives)
    judged: dict[tuple[float, str], Judged] = field(default_factory=dict)  # with images: each option measured


def choose(model: nn.Module, inputs: tuple, config: CSPConfig, goal: Goal, search: Search, pipeline: Pipeline,
           scope: str | None = None, leaf_modules: tuple[str, ...] = ()) -> nn.Module:
    """The model converted with the stages and options ``goal`` chooses, its record saying
    what was measured and chosen; ``pipeline`` is the api's; ``leaf_modules``, as convert's,
    for tracing the original where ``search.fold`` folds it."""
    if config.per_stage:
        raise ConfigError("a budget or objective chooses every stage's options, so it cannot take stage_gammas or "
                          "stage_hidden too.", "leave them out, or convert with them and no objective")
    device = target_device(search) if goal.timed else None
    walk = _Walk(model, inputs, config, goal, search, pipeline, scope, device, leaf_modules)
    if goal.target_flops is None and goal.target_latency is None:
        return walk.paying_stages()
    return walk.budget()


class _Walk:
    def __init__(self, model, inputs, config, goal, search, pipeline: Pipeline, scope, device, leaf_modules) -> None:
        self.model, self.inputs, self.config, self.goal, self.search = model, inputs, config, goal, search
        self.pipeline, self.convert, self.scope, self.device = pipeline, pipeline.convert, scope, device
        self.leaf_modules = leaf_modules
        self.times: dict[str, tuple[float, float]] = {}   # stage -> (ms without it, ms with it), the others converted
        self.left: dict[str, str] = {}                    # stage -> why the objective left it
        self.searched: set[str] = set()                   # the stages a budget could cut
        self.notes: list[str] = []
        self.reasons: dict[str, str] | None = None       # stage -> why it converts at no option given
        self.chosen: dict[str, Judged] = {}               # stage -> what its chosen option measured (with images)

    # -- objective latency: the stages that pay at the given options

    def paying_stages(self) -> nn.Module:
        everything = self.convert(self.config)
        record = conversion_of(everything, self.scope)
        candidates = [s.name for s in record.converted]
        self.reasons = {s.name: s.reason for s in record.stages if not s.converted}
        paying = self._in_context(candidates, self.config, everything)
        self.notes.append(f"objective latency: {len(paying)} of {len(candidates)} stages pay in time on "
                          f"{self.device} (batch {self.search.batch_size}, each stage timed in the converted model, "
                          "with it and without it)")
        paying, gm = self._together(paying)
        if not paying:
            raise NoStageError(
                f"none of the {len(candidates)} stages that convert makes the model faster on {self.device} "
                f"({self._times_text(candidates)}).",
                "convert by flops (the default objective), or try other options or another device",
            )
        return self._reattach(gm)

    def _in_context(self, names: list[str], config: CSPConfig, everything: nn.Module) -> list[str]:
        """The stages of ``names`` that pay in time where they run: ``everything`` (every one
        converted, with ``config``) timed against the model with each one left whole. Stages
        timed alone against the original do not add up (``benchmarks/stage_times.py``), so
        each is timed in the model it will be part of."""
        paying = []
        for name in names:
            others = tuple(n for n in names if n != name)
            without = self.convert(replace(config, stages=others)) if others else self.model
            before, after = self._time(without, everything)
            self.times[name] = (before, after)
            if after < before:
                paying.append(name)
            else:
                self.left[name] = (f"the converted model ran {after:.2f} ms with it and {before:.2f} ms without it on "
                                   f"{self.device}: it does not pay in time (objective latency)")
        return paying

    def _together(self, paying: list[str]) -> tuple[list[str], nn.Module | None]:
        """The stages of ``paying`` the model runs faster with than the original, all converted
        together, and that model: each paid where it was timed, but where the model with all
        of them is not faster than the original, the one that saved least is left and the
        others timed again."""
        paying = list(paying)
        while paying:
            gm = self.convert(replace(self.config, stages=tuple(paying)))
            before, after = self._time(self.model, gm)
            self.notes.append(f"the chosen stages together: {after:.2f} ms against {before:.2f} ms "
                              f"({after / before:.3f}) on {self.device}")
            if after < before:
                return paying, gm
            least = min(paying, key=lambda name: self.times[name][0] - self.times[name][1])
            self.left[least] = (f"with it and the other chosen stages the model ran {after:.2f} ms against the "
                                f"original's {before:.2f} ms on {self.device}; it saved least of them, so it was "
                                "left (objective latency)")
            paying.remove(least)
        return [], None

    def _time(self, first: nn.Module, second: nn.Module) -> tuple[float, float]:
        """Median ms of both models side by side, each folded for inference first where
        ``search.fold`` says so."""
        if self.search.fold:
            first, second = (fuse_for_inference(copy.deepcopy(m).eval(), self.inputs, leaf_modules=self.leaf_modules)
                             for m in (first, second))
        return time_models(first, second, self.inputs, self.search, self.device)

    def _why_not(self) -> dict[str, str]:
        """Why each stage that converts at no option chosen does not convert with the options
        given (every stage the user's filter selects, converted at once)."""
        if self.reasons is None:
            try:
                record = conversion_of(self.convert(self.config), self.scope)
            except NoStageError:
                return {}
            at = f"gamma {self.config.gamma:g}, hidden {self.config.hidden}"
            self.reasons = {s.name: s.reason if s.reason == NOT_SELECTED else
                            f"it saves flops at no option searched (at {at}: {s.reason})"
                            for s in record.stages if not s.converted}
        return self.reasons

    def _times_text(self, names: Iterable[str]) -> str:
        return "; ".join(f"{n}: {self.times[n][1]:.2f} ms with it, {self.times[n][0]:.2f} ms without" for n in names)

    # -- a budget: one option per stage

    def budget(self) -> nn.Module:
        stages = self._savings()
        if self.goal.timed:
            self._time_per_flop(stages)
            stages = self._paying(stages)
        if self.goal.target_latency is not None:
            return self._land_latency(stages)
        return self._land_flops(stages)

    def _paying(self, stages: list[_Stage]) -> list[_Stage]:
        paying = [s for s in stages if s.name not in self.left]
        if not paying:
            raise NoStageError(
                f"none of the stages that convert makes the model faster on {self.device} "
                f"({self._times_text(self.times)}).",
                "use target_flops with objective flops, or try another device",
            )
        return paying

    def _savings(self, exact: bool = False) -> list[_Stage]:
        """Every stage's flops saved at every option of the grid: the planner's estimate, or
        (``exact``) fvcore's count of one conversion per option."""
        stages: dict[str, _Stage] = {}
        for gamma, hidden in self.search.options:
            config = replace(self.config, gamma=gamma, hidden=hidden)
            for name, (before, after) in self._flops_at(config, exact).items():
                stage = stages.setdefault(name, _Stage(name, before, {}))
                if after < before:
                    stage.saved[(gamma, hidden)] = before - after
        found = [s for s in stages.values() if s.saved]
        self.searched |= {s.name for s in found}
        if not found:
            raise NoStageError("no stage saves flops at any option searched "
                               f"(gamma {'/'.join(f'{g:g}' for g in self.search.gammas)}, hidden "
                               f"{'/'.join(self.search.hidden)}).",
                               "search other options (Search(gammas=..., hidden=...)), or name other kinds of stage")
        return found

    def _flops_at(self, config: CSPConfig, exact: bool) -> dict[str, tuple[int, int]]:
        if not exact:
            return self.pipeline.estimate(config)
        try:
            report = self.pipeline.report(self.convert(config))
        except NoStageError:
            return {}
        return {row.name: (row.before.flops, row.after.flops) for row in report.stages if row.converted}

    def _time_per_flop(self, stages: list[_Stage]) -> None:
        """Time every stage once, in the model with every stage converted at the given options
        (or the nearest option a stage converts at): its measured ms saved per flop saved."""
        options = {s.name: min(s.saved, key=lambda o: (o[1] != self.config.hidden, abs(o[0] - self.config.gamma)))
                   for s in stages}
        config = self._config_of(options)
        paying = set(self._in_context(list(options), config, self.convert(config)))
        for stage in stages:
            if stage.name in paying:
                before, after = self.times[stage.name]
                stage.per_flop_ms = (before - after) / stage.saved[options[stage.name]]

    def _land_flops(self, stages: list[_Stage], exact: bool = False) -> nn.Module:
        target, original = self.goal.target_flops, self.pipeline.original_flops()
        need = (1 - target) * original
        window = (need, need + self.search.tolerance * original)
        evidence = self.pipeline.evidence
        if self.goal.objective == "latency":
            cost = lambda s, option, saved: -s.per_flop_ms * saved + 1e-3 * s.per_flop_ms * saved ** 2 / s.flops
            how = "the cut buys the most measured time"
        elif evidence is not None:
            self._judge(stages, evidence)
            cost = lambda s, option, saved: s.judged[option].loss
            how = (f"the cut that loses least by {next(iter(stages[0].judged.values())).measure} against the "
                   f"original on {len(evidence.held)} held-out images, each option calibrated on "
                   f"{len(evidence.fit)} (label-free)")
        else:
            cost, how = _even_cost, "the cut spread evenly over the stages' flops"
        picked = _pick(stages, window, cost, lambda s, saved: saved)
        if picked is None:
            deepest = sum(max(s.saved.values()) for s in stages)
            among = f" of the {len(stages)} stages that pay in time" if self.goal.timed else ""
            raise ConfigError(
                f"target_flops {target:g} is out of reach: the deepest cut{among} searched (gamma up to "
                f"{max(self.search.gammas):g}, hidden {'/'.join(self.search.hidden)}) leaves "
                f"{1 - deepest / original:.3f} of the original's flops.",
                f"ask for {math.ceil(1000 * (1 - deepest / original)) / 1000:g} or more, or search larger gammas",
            )
        gm = self.convert(self._config_of(picked))
        achieved = self.pipeline.report(gm).converted.flops / original
        predicted = 1 - sum(s.saved[picked[s.name]] for s in stages if s.name in picked) / original
        if not exact and abs(achieved - predicted) > self.search.tolerance / 4:
            self.notes.append(f"the planner's estimate ({predicted:.3f} of the flops) missed fvcore's count "
                              f"({achieved:.3f}), so every option was counted by fvcore")
            return self._land_flops(self._exact(stages), exact=True)
        self.notes.append(f"target flops {target:g}: {len(picked)} of {len(stages)} stages cut, {how} "
                          f"(gamma {'/'.join(f'{g:g}' for g in self.search.gammas)}, hidden "
                          f"{'/'.join(self.search.hidden)} searched)")
        off = "" if target - self.search.tolerance <= achieved <= target else (
            ": the nearest the options searched allow" + (", more than 0.02 from the target; search more gammas "
                                                            "to land closer" if abs(achieved - target) > 0.02 else ""))
        self.notes.append(f"flops land at {achieved:.3f} of the original's (target {target:g}){off}")
        if evidence is not None:
            by_name = {s.name: s for s in stages}
            self.chosen = {name: by_name[name].judged[option] for name, option in picked.items()}
            self.notes.append(f"the model chosen, calibrated: {evidence.judge(self.model, gm)} on the held-out images")
        return self._reattach(gm)

    def _judge(self, stages: list[_Stage], evidence: Evidence) -> None:
        """Each stage alone at each option it converts at, calibrated and judged (``Judged``)."""
        todo = [(s, option) for s in stages for option in s.saved if option not in s.judged]
        for stage, option in tqdm(todo, desc="cspify: judging each stage's options", unit="option", leave=False,
                                  disable=None):
            stage.judged[option] = evidence.judge(self.model, self.convert(self._config_of({stage.name: option})))

    def _exact(self, stages: list[_Stage]) -> list[_Stage]:
        """``stages`` again, their savings counted by fvcore (keeping what timing found)."""
        timed = {s.name: s for s in stages}
        exact = [s for s in self._savings(exact=True) if s.name in timed]
        for s in exact:
            s.per_flop_ms, s.judged = timed[s.name].per_flop_ms, timed[s.name].judged
        return exact

    def _land_latency(self, stages: list[_Stage]) -> nn.Module:
        target = self.goal.target_latency
        original_ms = sorted(before for before, _ in self.times.values())[len(self.times) // 2]
        need = (1 - target) * original_ms
        scale = 1.0  # measured ms saved over predicted, corrected after each timing
        for attempt in range(3):
            window = ((need / scale), (need + self.search.tolerance * original_ms) / scale)
            picked = _pick(stages, window, _even_cost, lambda s, saved: s.per_flop_ms * saved)
            if picked is None:
                best = sum(s.per_flop_ms * max(s.saved.values()) for s in stages) * scale
                raise ConfigError(
                    f"target_latency {target:g} is out of reach: by each stage's measured time, the deepest cut "
                    f"searched leaves about {1 - best / original_ms:.2f} of the original's {original_ms:.2f} ms on "
                    f"{self.device}.",
                    f"ask for {math.ceil(100 * (1 - best / original_ms)) / 100:g} or more, or use target_flops",
                )
            gm = self.convert(self._config_of(picked))
            before, after = self._time(self.model, gm)
            predicted = sum(s.per_flop_ms * s.saved[picked[s.name]] for s in stages if s.name in picked)
            self.notes.append(f"target latency {target:g}, choice {attempt + 1}: {len(picked)} stages cut, the model "
                              f"runs {after:.2f} ms against {before:.2f} ms ({after / before:.3f}) on {self.device}")
            if after / before <= target + self.search.tolerance or before <= after:
                break
            scale = max((before - after) / before * original_ms / predicted, 0.05)
        if after / before > target + self.search.tolerance:
            self.notes.append(f"target latency {target:g} missed: the stages' measured savings did not add up on "
                              f"{self.device} (a busy machine moves timings by more than a stage saves); time on a "
                              "quiet machine, or with more rounds and a longer min_run_time (cspify.Search)")
        return self._reattach(gm)

    # -- the chosen options, and the record

    def _config_of(self, picked: dict[str, tuple[float, str]]) -> CSPConfig:
        return replace(self.config, stages=tuple(picked),
                       stage_gammas=tuple((name, g) for name, (g, _) in picked.items()),
                       stage_hidden=tuple((name, h) for name, (_, h) in picked.items()))

    def _reattach(self, gm: nn.Module) -> nn.Module:
        """Leave the record with the objective, the times and why stages were left."""
        part = gm.get_submodule(self.scope) if self.scope else gm
        record: Conversion = conversion_of(part)
        stages = []
        for s in record.stages:
            before, after = self.times.get(s.name, (None, None))
            s = replace(s, time_before_ms=before, time_after_ms=after)
            if s.name in self.chosen:
                s = replace(s, notes=s.notes + (f"chosen at gamma {s.gamma:g}, hidden {s.hidden}, which alone and "
                                                f"calibrated measured {self.chosen[s.name]}",))
            if not s.converted and s.name in self.left:
                s = replace(s, reason=self.left[s.name])
            elif not s.converted and s.name in self.searched:
                s = replace(s, reason="the budget left it whole: the cuts chosen for the other stages land on the "
                                      "target")
            elif not s.converted and s.reason == NOT_SELECTED:  # the choice's filter: say why it was not chosen
                s = replace(s, reason=self._why_not().get(s.name, s.reason))
            stages.append(s)
        attach(part, replace(record, stages=tuple(stages), objective=self.goal.objective,
                             targets=self.goal.targets, notes=tuple(self.notes)))
        return gm


def _even_cost(stage: _Stage, option: tuple[float, str], saved: int) -> float:
    """F r^2 for a cut of r = saved / F of a stage's F flops: least where cuts are even."""
    return saved * saved / max(stage.flops, 1)


def _pick(stages: list[_Stage], window: tuple[float, float], cost: Callable[[_Stage, tuple, int], float],
          amount: Callable[[_Stage, int], float]) -> dict[str, tuple[float, str]] | None:
    """One option per stage (or none) whose summed ``amount`` lies in ``window`` at the least
    summed ``cost``; where none lands in it, the sum nearest to it (above it on a tie); None
    where even the largest sum stays below it by more than its width. A knapsack over
    stages, on ``amount`` in steps of a twentieth of the window."""
    low, high = window
    step = max((high - low) / 20, 1e-12)
    states: dict[int, tuple[float, float, tuple]] = {0: (0.0, 0.0, ())}   # bucket -> (cost, amount, picks)
    for stage in stages:
        moves = [(None, 0.0, 0.0)] + [
            (option, amount(stage, saved), cost(stage, option, saved) + 1e-9 * stage.flops * (option[0] + (option[1] != "keep")))
            for option, saved in stage.saved.items()]
        new: dict[int, tuple[float, float, tuple]] = {}
        for total_cost, total, picks in states.values():
            for option, more, extra in moves:
                value = (total_cost + extra, total + more, picks + ((stage.name, option),) if option else picks)
                bucket = int(value[1] // step)
                if bucket not in new or value[0] < new[bucket][0]:
                    new[bucket] = value
        states = new
    inside = [s for s in states.values() if low <= s[1] <= high]
    if inside:
        return dict(min(inside, key=lambda s: s[0])[2])
    if max(s[1] for s in states.values()) < low - (high - low):
        return None
    nearest = min(states.values(), key=lambda s: (max(low - s[1], s[1] - high), s[1] < low, s[0]))
    return dict(nearest[2])

