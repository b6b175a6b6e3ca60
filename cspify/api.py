"""The three verbs, each a short walk down the pipeline:

    trace ─▶ find ─▶ plan ─▶ rewrite          convert(model, inputs, gamma=0.5)
    (convert ─▶ measure | time) x n ─▶ convert   convert(model, inputs, target_flops=0.7)  (cspify.budget)
    trace ─▶ find                             find_stages(model, inputs)
    measure x2 ─▶ report                      compare(model, converted, inputs)
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn

from cspify import budget, pyramid, rules
from cspify.channels import stream_axis
from cspify.config import CSPConfig
from cspify.errors import ConfigError, CspifyError, NoStageError, TraceError
from cspify.graph import shape
from cspify.agreement import Evidence
from cspify.host import keep_host_attributes
from cspify.importance import Importance
from cspify.inplace import restore_inplace_adds
from cspify.measure import measure
from cspify.modes import trace_in_mode
from cspify.parts import convert_parts
from cspify.plan import plan_stage, stage_flops
from cspify.reasons import brief, grouped, joined, module_names, readable
from cspify.regions import part_of, regions
from cspify.record import Conversion, StageRecord, attach, conversion_of
from cspify.report import Report, StageRow, build_report
from cspify.rewrite import rewrite
from cspify.stage import KINDS, Stage, StagePlan
from cspify.trace import (
    Traced,
    as_inputs,
    capture_inputs,
    eval_mode,
    networkx_view,
    propagate_shapes,
    ready_to_trace,
    trace,
)


def find_stages(
    model: nn.Module, example_inputs, *, leaf_modules: Iterable[str] = (), kinds: Iterable[str] | str | None = None
) -> list[Stage]:
    """The stages of ``model`` (of ``kinds``, default every kind), found by graph
    structure; nothing changes."""
    _check_leaves(model, leaf_modules)
    kinds = CSPConfig(kinds=kinds).kinds if kinds is not None else None
    return rules.find_stages(trace(ready_to_trace(model, example_inputs), example_inputs, leaf_modules), kinds)


def convert(
    model: nn.Module,
    example_inputs,
    gamma: float = 0.5,
    *,
    fusion: str = "last",
    hidden: str = "keep",
    stages: Iterable[str] | None = None,
    allow_costlier: bool = False,
    kinds: Iterable[str] | str | None = None,
    round_to: int = 1,
    split: str = "last",
    pyramid: str = "none",
    scope: str | None = None,
    leaf_modules: Iterable[str] = (),
    seed: int = 0,
    data=None,
    config: CSPConfig | None = None,
    objective: str = "flops",
    target_flops: float | None = None,
    target_latency: float | None = None,
    search: budget.Search | None = None,
    refuse_none: bool = True,
    parts: bool = True,
) -> nn.Module:
    """The CSP version of ``model`` as a new GraphModule; ``model`` itself is not touched.

    With ``scope`` ("backbone.body"), only that submodule is traced and converted (leaf
    names are then relative to it), and a copy of the whole model with the converted part
    in its place is returned: the way to convert models torch.fx cannot trace whole.

    Stages of every kind are looked for (``kinds``: a subset of ``cspify.stage.KINDS``,
    ``("residual", "dense")`` for the paper's transform alone). Every stage found is
    converted unless ``stages`` names a subset, or its conversion
    would cost more multiply-adds than it saves (``allow_costlier=True`` converts those too). Outputs keep their
    shapes and dtypes. ``cspify.record.conversion_of(gm)`` says what was done.
    ``round_to=8`` (or 16) rounds every width the conversion narrows to a multiple of that
    many channels, as fast kernels want them (``CSPConfig.round_to``).

    ``data`` (unlabeled images: a tensor, a Dataset or batches, as ``calibrate`` takes them)
    with ``split="importance"`` lets the split choose which channels run through each stage:
    those it works on most, measured on 512 of the images (``cspify.importance``). Without
    images, or with ``split="last"`` (the default), the last channels run through. With
    ``target_flops`` too, the images also choose each stage's option: each stage alone at
    each option is calibrated on 512 of them and judged on 256 others against the original
    (``cspify.agreement``: KL of a classifier's outputs, else their relative error), and the
    options that lose least in sum land on the budget; the record's notes say what each
    choice measured.

    A submodule torch.fx cannot trace is kept whole; its traceable parts (a detector's head
    towers) are converted on their own, as ``scope`` would convert them (``cspify.parts``;
    ``parts=False`` leaves them, as a stage filter or a goal does).

    ``pyramid="maxout"`` also compresses every concat that fuses pyramid levels, where one
    conv reads it, by Maxout over pairs of channels (the paper's EFM; ``cspify.pyramid``).

    ``config`` (a CSPConfig) replaces the nine conversion options; giving both is refused.

    ``objective="latency"`` converts only the stages that make the model faster on the
    target device (each timed in the converted model, with it and without it, then the
    chosen ones together against the original); ``target_flops=0.7`` (or ``target_latency=0.8``)
    chooses each stage's gamma and inner widths so the model lands at that fraction of the
    original's flops (or measured time); ``search`` (a ``cspify.budget.Search``) says which
    options are searched and how stages are timed. See ``cspify.budget``.

    Where no stage converts, a NoStageError says why in one sentence; with
    ``refuse_none=False`` (what ``cspify analyze`` shows) a copy of the traced model comes
    back unchanged instead, its record saying why each stage found was left (a goal
    still refuses).
    """
    config = _config(config, gamma, fusion, hidden, stages, allow_costlier, kinds, round_to, split, pyramid)
    raw = data is not None and not isinstance(data, Importance)
    importance = Importance(data, seed=seed) if raw and config.split == "importance" else (None if raw else data)
    goal = budget.Goal(objective, target_flops, target_latency)
    if goal.active or search is not None:
        judging = raw and goal.target_flops is not None and goal.objective == "flops"
        return _convert_by_goal(model, example_inputs, config, goal, search or budget.Search(), scope,
                                tuple(leaf_modules), seed, importance, Evidence(data, seed=seed) if judging else None)
    inputs = as_inputs(example_inputs)
    model = ready_to_trace(model, inputs)  # lazy modules initialised, on a copy
    if scope:
        return _convert_scope(model, inputs, scope, config, leaf_modules, seed, refuse_none, importance, parts)
    _check_leaves(model, leaf_modules)
    traced = trace_in_mode(model, inputs, leaf_modules)
    found = rules.find_stages(traced, config.kinds)
    if not found:
        refusal = _none_found(model, traced, config)
        if refuse_none:
            raise refusal
        return _left_whole(model, traced, config, [], leaf_modules, seed,
                           f"{refusal.message.rstrip('.')}; {refusal.hint.split('; run `cspify analyze`')[0]}")
    _check_filter(config, found)
    scores = importance.scores(traced, found) if importance is not None and config.split == "importance" else {}
    plans = [plan_stage(traced, stage, config, scores.get(stage.name)) for stage in found]
    refusal = _refusal(model, traced, plans)
    if refusal is not None:
        return _refused(refusal, refuse_none, model, traced, config, plans, leaf_modules, seed)
    gm, added, problems = _rewrite_checked(traced, plans, inputs, seed)
    if problems:  # find the stages whose rewrite fails a check, refuse them, convert the rest
        plans = [_alone_ok(model, inputs, leaf_modules, plans, plan, seed) for plan in plans]
        traced = trace_in_mode(model, inputs, leaf_modules)  # the rewrite edited the first trace in place
        refusal = _refusal(model, traced, plans)
        if refusal is not None:
            return _refused(refusal, refuse_none, model, traced, config, plans, leaf_modules, seed)
        gm, added, problems = _rewrite_checked(traced, plans, inputs, seed)
        if problems:
            raise CspifyError(
                f"the converted model fails a check ({problems[0]}), which is a bug in cspify.",
                "please report it with the model; convert fewer stages with --stage meanwhile",
            )
    fusions = _compressed(gm, inputs) if config.pyramid == "maxout" else ()
    kept = tuple(traced.kept_whole.items())  # submodules torch.fx cannot trace, kept whole as leaves
    record = _record(config, plans, added, seed, tuple(leaf_modules) + tuple(m for m, _ in kept), kept)
    record = replace(record, fusions=fusions, notes=record.notes + tuple(f.note for f in fusions))
    converted_parts, notes = ((), ())
    if parts and kept and config.stages is None:  # their traceable parts, each converted on its own
        converted_parts, notes = convert_parts(model, inputs, gm, [m for m, _ in kept], config, seed, convert)
    attach(gm, replace(record, images=importance.images if scores else 0, parts=converted_parts,
                       notes=record.notes + notes))
    keep_host_attributes(model, gm)  # what a host framework reads on the model (ultralytics' names, stride)
    return gm


def _compressed(gm: fx.GraphModule, inputs: tuple) -> tuple:
    """``pyramid.compress`` on the converted graph, its outputs checked to keep their shapes."""
    expected = _output_shapes(gm)
    fusions = pyramid.compress(gm)
    try:
        propagate_shapes(gm, inputs)
    except TraceError as error:
        raise CspifyError(f"the model does not run with its pyramid compressed ({error.message}), which is a bug in "
                          "cspify.", "please report it with the model; convert without --pyramid meanwhile") from None
    if _output_shapes(gm) != expected:
        raise CspifyError(f"compressing the pyramid changed the outputs from {expected} to {_output_shapes(gm)}, "
                          "which is a bug in cspify.", "please report it with the model; convert without --pyramid meanwhile")
    return fusions


def _convert_by_goal(model, example_inputs, config, goal, search, scope, leaf_modules, seed, importance,
                     evidence) -> nn.Module:
    """``convert`` with the stages and options a goal chooses (``cspify.budget.choose``)."""
    inputs = as_inputs(example_inputs)
    model = ready_to_trace(model, inputs)
    pipeline = _Pipeline(model, inputs, scope, leaf_modules, seed, importance, evidence)
    return budget.choose(model, inputs, config, goal, search, pipeline, scope, leaf_modules)


class _Pipeline:
    """What ``cspify.budget`` asks of the pipeline, for one model: conversions, reports
    against the original (measured once), and the planner's flops estimate per stage (on
    one trace of the model, planned afresh for each config, nothing rewritten)."""

    def __init__(self, model: nn.Module, inputs: tuple, scope: str | None, leaf_modules: tuple[str, ...],
                 seed: int, importance: Importance | None = None, evidence: Evidence | None = None) -> None:
        self.model, self.inputs, self.scope, self.leaf_modules, self.seed = model, inputs, scope, leaf_modules, seed
        self.evidence = evidence  # images a flops budget judges each option on, or None
        self.importance = importance.within(model, scope) if importance is not None and scope else importance
        self._part = None      # (the original, or its submodule at scope; its inputs)
        self._before = None    # its Measurement
        self._traced = None    # (Traced, stages found, the kinds they were found for)

    def convert(self, config: CSPConfig) -> nn.Module:
        if self.scope:  # the scoped part with the images as it receives them, measured once
            part, inputs = self.part()
            converted = convert(part, inputs, config=config, leaf_modules=self.leaf_modules, seed=self.seed,
                                data=self.importance, parts=False)
            return _scoped_back(self.model, self.inputs, self.scope, part, converted)
        return convert(self.model, self.inputs, config=config, leaf_modules=self.leaf_modules, seed=self.seed,
                       data=self.importance, parts=False)

    def part(self) -> tuple[nn.Module, tuple]:
        if self._part is None:
            self._part = capture_inputs(self.model, self.inputs, self.scope) if self.scope else (self.model, self.inputs)
        return self._part

    def original(self):
        if self._before is None:
            part, inputs = self.part()
            self._before = measure(part, inputs, self.leaf_modules)
        return self._before

    def original_flops(self) -> int:
        return self.original().totals.flops

    def report(self, converted: nn.Module) -> Report:
        part = converted.get_submodule(self.scope) if self.scope else converted
        return build_report(self.original(), measure(part, self.part()[1], self.leaf_modules), conversion_of(part))

    def estimate(self, config: CSPConfig) -> dict[str, tuple[int, int]]:
        if self._traced is None or self._traced[2] != config.kinds:
            part, inputs = self.part()
            _check_leaves(part, self.leaf_modules)
            traced = trace_in_mode(part, inputs, self.leaf_modules)
            self._traced = (traced, rules.find_stages(traced, config.kinds), config.kinds)
        traced, found, _ = self._traced
        _check_filter(config, found)
        use = self.importance is not None and config.split == "importance"
        scores = self.importance.scores(traced, found) if use else {}
        plans = (plan_stage(traced, stage, config, scores.get(stage.name)) for stage in found)
        return {plan.name: stage_flops(traced, plan) for plan in plans if plan.converted}


def _none_found(model: nn.Module, traced: Traced, config: CSPConfig) -> NoStageError:
    """The refusal of a model with no stage of the kinds asked for."""
    kinds = config.kinds or KINDS
    kept = [f"'{m}' {why.replace('torch.fx cannot trace it', 'torch.fx cannot trace')}"
            for m, why in traced.kept_whole.items()]
    if len(kept) > 3:
        kept = kept[:3] + [f"and {len(kept) - 3} more"]
    return NoStageError(
        f"{type(model).__name__} has no {', '.join(kinds[:-1])}{' or ' if len(kinds) > 1 else ''}{kinds[-1]} stage"
        + (f" outside the submodules kept whole ({'; '.join(kept)})." if kept else "."),
        "cspify converts " + joined([f"{rules.DESCRIPTIONS[kind]} ({kind})" for kind in KINDS])
        + ("; without --kind it looks for every kind" if config.kinds else "")
        + "; run `cspify analyze` to see what it finds",
    )


def _refusal(model: nn.Module, traced: Traced, plans: list[StagePlan]) -> NoStageError | None:
    """Where no plan converts, the refusal: one short sentence, the stages refused alike
    named together (by their reason's gist where only its details differ), with modules
    named as the model names them, not by their torch.fx node names."""
    if any(plan.converted for plan in plans):
        return None
    names = module_names(traced.gm, model)
    reasons = grouped(list(zip([p.name for p in plans], brief([readable(p.reason, names) for p in plans]))))
    hints = []
    if any(plan.stage.cross_stage for plan in plans):
        hints.append("a block that is cross stage partial already converts only when named: --stage (stages=) "
                     "nests a second CSP in it")
    if not all(plan.stage.cross_stage for plan in plans):
        hints.append("try another gamma, or --allow-costlier (allow_costlier) where a stage costs more than it saves")
    hints.append("`cspify analyze` shows every stage found and why it was left")
    return NoStageError(
        f"none of the {len(plans)} stages found in {type(model).__name__} can be converted ({reasons}).",
        "; ".join(hints),
    )


def _refused(refusal: NoStageError, refuse_none: bool, model, traced, config, plans, leaf_modules, seed) -> nn.Module:
    """Raise ``refusal``, or (``refuse_none=False``) give back the model as it was with why."""
    if refuse_none:
        raise refusal
    note = f"none of the {len(plans)} stages found can be converted: the model is as it was"
    return _left_whole(model, traced, config, plans, leaf_modules, seed, note)


def _left_whole(model, traced: Traced, config: CSPConfig, plans: list[StagePlan], leaf_modules, seed: int,
                note: str) -> nn.Module:
    """A copy of the traced model, unchanged, with the record of every stage found and ``note``."""
    gm = copy.deepcopy(traced.gm)
    kept = tuple(traced.kept_whole.items())
    record = _record(config, plans, {}, seed, tuple(leaf_modules) + tuple(m for m, _ in kept), kept)
    attach(gm, replace(record, notes=record.notes + (note,)))
    keep_host_attributes(model, gm)
    return gm


def _rewrite_checked(traced: Traced, plans: list[StagePlan], inputs: tuple, seed: int):
    """Rewrite, then check the result against the original on the example inputs:
    (GraphModule, nodes added per stage, the problems found, one sentence each).

    The in-place adds are restored last and kept only where the outputs keep their dtypes
    under bf16 autocast too (an fp32 bias added in place to a bf16 conv output would not)."""
    expected = _output_shapes(traced.gm), _output_dtypes(traced.gm, _AutocastDtypes(traced.gm).dtypes(inputs))
    gm, added = rewrite(traced, plans, seed=seed)
    try:
        propagate_shapes(gm, inputs)
    except TraceError as error:  # the original ran on these inputs: this one is ours
        return gm, added, [f"the converted model does not run: {error.message}"]
    if _output_shapes(gm) != expected[0]:
        return gm, added, [f"its outputs changed from {expected[0]} to {_output_shapes(gm)}"]
    split = _split_axis_problems(gm, plans, added)
    if split:
        return gm, added, split
    dtypes = _AutocastDtypes(gm).dtypes(inputs)
    got = _output_dtypes(gm, dtypes)
    if got != expected[1]:
        return gm, added, [f"its outputs under bf16 autocast changed dtype from {expected[1]} to {got}"]
    _restore_inplace_adds_keeping(gm, dtypes)
    return gm, added, []


def _split_axis_problems(gm: fx.GraphModule, plans: list[StagePlan], added: dict) -> list[str]:
    """Each converted stage's bypass must be the base's slice along the axis that the layers
    reading its through part treat as channels (derived again on the converted graph)."""
    traced = Traced(gm, networkx_view(gm))
    for plan in (p for p in plans if p.converted):
        bypass, through = (traced.nodes[n] for n in added[plan.name][:2])
        partial = set(plan.partial_stage)
        axis, why = stream_axis(traced, [n for n in traced.nodes if n in partial], through.name)
        if axis != bypass.args[1] % len(shape(bypass)):
            return [f"its bypass splits axis {bypass.args[1]} of '{plan.stage.base}', "
                    f"but {f'its layers read axis {axis}' if axis is not None else why}"]
    return []


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def _output_dtypes(gm: fx.GraphModule, dtypes: dict | None) -> list | None:
    return None if dtypes is None else [dtypes[n.name] for n in _output_node(gm).all_input_nodes]


def _restore_inplace_adds_keeping(gm: fx.GraphModule, dtypes: dict | None) -> None:
    """restore_inplace_adds, then back out of place each add whose receiver has another dtype
    than the sum under bf16 autocast (``dtypes``: an fp32 bias added to a bf16 linear output)."""
    kept = {n.name for n in gm.graph.nodes if n.target == "add_"}
    if not restore_inplace_adds(gm):
        return
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "add_" and node.name not in kept:
            if dtypes is None or dtypes.get(node.args[0].name) != dtypes.get(node.name):
                node.op, node.target = "call_function", operator.add
    gm.recompile()


class _AutocastDtypes(fx.Interpreter):
    """The dtype of every node's value in one eval-mode run under CPU bf16 autocast."""

    def dtypes(self, inputs: tuple) -> dict[str, torch.dtype] | None:
        self.seen: dict[str, torch.dtype] = {}
        try:
            with eval_mode(self.module), torch.autocast("cpu", dtype=torch.bfloat16):
                self.run(*inputs)
        except Exception:  # a model autocast cannot run: keep every add out of place
            return None
        return self.seen

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        self.seen[node.name] = getattr(value, "dtype", None)
        return value


def _alone_ok(model, inputs, leaf_modules, plans, plan: StagePlan, seed: int) -> StagePlan:
    """``plan`` if its stage alone converts and passes the checks, else the plan refused with why."""
    if not plan.converted:
        return plan
    alone = [p if p is plan else replace(p, converted=False, reason="") for p in plans]
    _, _, problems = _rewrite_checked(trace_in_mode(model, inputs, leaf_modules), alone, inputs, seed)
    if not problems:
        return plan
    return replace(plan, converted=False, reason=f"its conversion failed a check ({problems[0]}), so it was left as it was")


def compare(
    original: nn.Module, converted: nn.Module, example_inputs, *, scope: str | None = None, leaf_modules: Iterable[str] = ()
) -> Report:
    """Measure both models and report totals and per-stage savings.

    With ``scope``, both models are measured at that submodule (the part ``convert`` changed).
    """
    inputs = as_inputs(example_inputs)
    whole = original
    original = ready_to_trace(original, inputs)
    if scope:
        original, inputs = capture_inputs(original, inputs, scope)
        converted = converted.get_submodule(scope)
    before = measure(original, inputs, leaf_modules)
    after = measure(converted, inputs, leaf_modules)
    record = conversion_of(converted)
    report = build_report(before, after, _named(record, converted, original))
    part = part_of(whole, scope)
    found = regions(before, after, part) if part is not None else []
    report.regions = found if len(found) > 1 else []
    for path in record.parts if record else ():  # each measured where it runs, fed what it receives there
        part = compare(original, converted, inputs, scope=path)
        report.stages += [StageRow(replace(row.record, name=f"{path}:{row.name}"), row.before, row.after)
                          for row in part.stages]
    return report


def _named(record: Conversion | None, converted: nn.Module, original: nn.Module) -> Conversion | None:
    """The record with its reasons and notes naming modules, not torch.fx nodes (the record
    on the model keeps the node names, as the graphs use them)."""
    names = module_names(converted, original) if record is not None else {}
    if not names:
        return record

    def named(stage: StageRecord) -> StageRecord:  # the record itself where no name changes
        reason, notes = readable(stage.reason, names), tuple(readable(n, names) for n in stage.notes)
        return stage if (reason, notes) == (stage.reason, stage.notes) else replace(stage, reason=reason, notes=notes)

    stages, notes = tuple(named(s) for s in record.stages), tuple(readable(n, names) for n in record.notes)
    same = notes == record.notes and all(a is b for a, b in zip(stages, record.stages))
    return record if same else replace(record, stages=stages, notes=notes)


def _convert_scope(model, inputs, scope, config, leaf_modules, seed, refuse_none: bool = True,
                   importance: Importance | None = None, parts: bool = True) -> nn.Module:
    """Convert the submodule at ``scope`` and put it back into a copy of the whole model."""
    part, part_inputs = capture_inputs(model, inputs, scope)
    converted_part = convert(part, part_inputs, config=config, leaf_modules=leaf_modules, seed=seed,
                             refuse_none=refuse_none, parts=parts,
                             data=importance.within(model, scope) if importance is not None else None)
    return _scoped_back(model, inputs, scope, part, converted_part)


def _scoped_back(model, inputs, scope, part, converted_part) -> nn.Module:
    """A copy of ``model`` with ``converted_part`` at ``scope``, its record saying so.

    ``convert`` checks the part's outputs keep their shapes; the whole model (whose output
    shapes may depend on the data, as a detector's do) must still run.
    """
    attach(converted_part, replace(conversion_of(converted_part), scope=scope))
    keep_host_attributes(part, converted_part)
    whole = copy.deepcopy(model)
    parent, _, name = scope.rpartition(".")
    setattr(whole.get_submodule(parent) if parent else whole, name, converted_part)
    try:
        with eval_mode(whole):
            whole(*inputs)
    except Exception as exc:
        raise CspifyError(
            f"the model no longer runs after converting {scope!r} ({type(exc).__name__}: {exc}), which is a bug in cspify.",
            "please report it with the model; try a smaller scope meanwhile",
        ) from exc
    return whole


def _check_leaves(model: nn.Module, leaf_modules: Iterable[str]) -> None:
    """Every leaf name must be a submodule: a typo would otherwise be ignored silently."""
    missing = []
    for name in leaf_modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            missing.append(name)
    if missing:
        children = ", ".join(name for name, _ in model.named_children()) or "none"
        raise ConfigError(
            f"the model has no submodule {', '.join(repr(m) for m in missing)} to keep as a leaf.",
            f"name a submodule by its dotted path (with --scope, relative to the scope); its top-level submodules are: {children}",
        )


def _check_filter(config: CSPConfig, found: list[Stage]) -> None:
    names = [stage.name for stage in found]
    named = (config.stages or ()) + tuple(n for n, _ in config.stage_gammas + config.stage_hidden)
    unknown = list(dict.fromkeys(s for s in named if s not in names))
    if unknown:
        raise ConfigError(
            f"no stage is named {', '.join(repr(s) for s in unknown)}.",
            f"the stages found are: {', '.join(names)}",
        )


def _output_shapes(gm: fx.GraphModule) -> list:
    """Shape and dtype of every output, from the shapes propagated on the graph."""
    return [(shape(n), n.meta.get("tensor_meta").dtype if shape(n) else None) for n in _output_node(gm).all_input_nodes]


def _config(config, gamma, fusion, hidden, stages, allow_costlier, kinds, round_to, split, pyramid) -> CSPConfig:
    """One validated CSPConfig from either the record or the separate options, never both."""
    separate = CSPConfig(gamma, fusion, hidden, tuple(stages) if stages is not None else None, allow_costlier, kinds,
                         round_to=round_to, split=split, pyramid=pyramid)
    if config is None:
        return separate
    if separate != CSPConfig():
        raise ConfigError(
            "convert() got both config= and separate conversion options (gamma, fusion, hidden, stages, allow_costlier, "
            "kinds, round_to, split, pyramid).",
            "put every option in the CSPConfig, or pass them separately without config=",
        )
    return config


def _record(config: CSPConfig, plans: list[StagePlan], added: dict[str, tuple[str, ...]], seed: int,
            leaf_modules: tuple[str, ...], kept_whole: tuple[tuple[str, str], ...] = ()) -> Conversion:
    """What compare, sweep, calibration and fine-tuning need to know about a conversion."""
    stages = []
    for p in plans:
        new = tuple(added.get(p.name, ()))
        stages.append(StageRecord(
            name=p.name, kind=p.stage.kind, channels=p.stage.channels, converted=p.converted, reason=p.reason,
            bypass_channels=p.bypass_channels, through_channels=p.through_channels, base=p.stage.base,
            blocks=len(p.stage.blocks), nodes=tuple(p.stage.nodes), added=new, output=p.through_output,
            converted_output=new[-1] if p.converted and new else "", notes=tuple(p.notes), through_index=p.through_index,
            output_index=p.output_index,
            narrowings=p.narrowings,
            gamma=config.for_stage(p.name).gamma, hidden=config.for_stage(p.name).hidden, fusion=p.fusion,
        ))
    return Conversion(config, tuple(stages), seed=seed, leaf_modules=leaf_modules, kept_whole=kept_whole)
