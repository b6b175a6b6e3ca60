"""The CSP rewrite: executes StagePlans as edits of the traced graph.

For each converted stage (fusion last):

    x0 ─┬─ narrow(x0, 0, bypass) ────────────────────────────────┐
        └─ narrow(x0, bypass, through) ─ narrowed blocks ─ partial transition ─ cat ─▶

Where the plan chose other channels to run through (``through_index``: by importance), the
through part gathers them; where the output's channels are the base's (a residual stream),
the concat puts each channel back in its place (``output_index``), else the bypass comes first.

The split and the concat work along the stage's channel axis. The partial transition is
the stage's own (narrowed) transition layer where the plan reuses it, else a new pointwise
layer over that axis (a 1x1 conv, or a linear layer where the channels are last) followed
by the norm and activation the plan names as templates, sized to its width. Fusion first
concatenates before the transition instead. Every choice (widths, which layers keep which
channels, whether a new transition is added and how wide) is the plan's; this module only
carries it out, and knows no model family.

    gm, added = rewrite(traced, plans, seed=0)   # edits traced.gm in place and returns it
    added["layer1"][-1]                          # the node that now carries layer1's output
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from cspify.graph import shape
from cspify.narrow import fresh_like, fresh_mix, narrow_layer, narrow_tensor, replace_tensor, sized_like
from cspify.ops import rule_for
from cspify.stage import StagePlan
from cspify.trace import Traced, device_of


def rewrite(traced: Traced, plans: list[StagePlan], seed: int = 0) -> tuple[fx.GraphModule, dict[str, tuple[str, ...]]]:
    """Apply every converted plan; return the GraphModule and the nodes each stage added.

    ``added[stage name]`` lists the new nodes in the order they were made; its last node
    is the one that now carries the stage's output (the concat for fusion last, the new
    transition's last node for fusion first). New layers are initialised from ``seed`` so
    the same inputs give the same model.
    """
    gm = traced.gm
    added, fused = {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for plan in plans:
            if plan.converted:
                added[plan.name] = _rewrite_stage(gm, plan, fused)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, added


def _rewrite_stage(gm: fx.GraphModule, plan: StagePlan, fused_outputs: dict[str, fx.Node]) -> tuple[str, ...]:
    """Edit one stage in; ``fused_outputs`` maps earlier stages' outputs to their concats,
    for a stage whose base is another stage's output."""
    stage = plan.stage
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    axis, slug = stage.channel_axis, stage.name.replace(".", "_").replace("#", "_")
    base = fused_outputs.get(stage.base, nodes[stage.base])
    added = []

    def call(target, args, name):
        node = graph.create_node("call_function", target, args, name=f"{slug}_{name}")
        added.append(node.name)
        return node

    def transition(source):
        templates = tuple(nodes[n] if n else None for n in (plan.norm_template, plan.act_template))
        in_channels, out_channels = plan.new_transition
        rank = len(shape(nodes[plan.through_output]))
        mix = fresh_mix(in_channels, out_channels, rank, axis, bias=plan.norm_template is None)
        return _partial_transition(gm, source, mix, out_channels, templates, _home(gm, stage.name, slug), added)

    width = plan.bypass_channels + plan.through_channels
    if plan.through_index is None:  # the first channels bypass, the last run through
        with graph.inserting_after(base):
            bypass = call(torch.narrow, (base, axis, 0, plan.bypass_channels), "bypass")
        with graph.inserting_after(bypass):
            through = call(torch.narrow, (base, axis, plan.bypass_channels, plan.through_channels), "through")
    elif plan.output_index is not None:  # the bypass channels are read where the output is joined
        bypass = None
        through = _gather(call, base, axis, plan.through_index, "through", after=base)
    else:
        others = [i for i in range(width) if i not in set(plan.through_index)]
        bypass = _gather(call, base, axis, others, "bypass", after=base)
        through = _gather(call, base, axis, plan.through_index, "through", after=bypass)
        added[:] = [bypass.name, through.name] + [n for n in added if n not in (bypass.name, through.name)]
    for name in plan.partial_stage:
        nodes[name].replace_input_with(base, through)
    _narrow_layers(gm, plan, nodes)
    for (node, key), value in plan.args:  # literal sizes narrowing changes: slice bounds, split sizes
        target = nodes[node]
        if isinstance(key, int):
            target.args = (*target.args[:key], value, *target.args[key + 1:])
        else:
            target.kwargs = {**target.kwargs, key: value}

    out = nodes[plan.through_output]
    users = list(out.users)
    with graph.inserting_after(out):
        if plan.output_index is not None:
            last = transition(out) if plan.new_transition else out
            fused, bypass = _in_place(call, base, last, axis, plan.output_index, width, after=last)
            added[:] = [bypass.name, through.name] + [n for n in added if n not in (bypass.name, through.name)]
        elif plan.fusion == "last":
            last = transition(out) if plan.new_transition else out
            with graph.inserting_after(last):
                fused = call(torch.cat, ([bypass, last], axis), "fuse")
        else:
            fused = call(torch.cat, ([bypass, out], axis), "fuse")
            if plan.new_transition:
                with graph.inserting_after(fused):
                    fused = transition(fused)
    fused = _as_dtype_of(graph, fused, out, slug, added)  # the stage's output dtype, as before (autocast)
    for user in users:
        user.replace_input_with(out, fused)
    fused_outputs[out.name] = fused
    return tuple(added)


def _gather(call, base: fx.Node, axis: int, index, name: str, after: fx.Node) -> fx.Node:
    """The channels ``index`` of ``base``: one narrow per run of consecutive channels, and
    a concat of them where there are several, inserted in order after ``after``."""
    runs = []
    for i in index:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    graph, parts = base.graph, []
    for k, (start, length) in enumerate(runs):
        with graph.inserting_after(after):
            after = call(torch.narrow, (base, axis, start, length), name if len(runs) == 1 else f"{name}_{k}")
        parts.append(after)
    if len(parts) == 1:
        return parts[0]
    with graph.inserting_after(after):
        return call(torch.cat, (parts, axis), name)


def _in_place(call, base: fx.Node, last: fx.Node, axis: int, positions, width: int,
              after: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The stage output with every channel in its place: channel c of ``base`` at each
    position c not in ``positions``, and channel j of ``last`` (the partial transition) at
    ``positions[j]``. One narrow per run of channels from one source, joined by one concat,
    which moves no more memory than the two-part concat it replaces. Returns the concat and
    the first narrow of the base (the bypass, as the checks read it)."""
    where = {p: j for j, p in enumerate(positions)}
    runs = []  # [source, first channel, length]
    for p in range(width):
        source, channel = (last, where[p]) if p in where else (base, p)
        if runs and runs[-1][0] is source and runs[-1][1] + runs[-1][2] == channel:
            runs[-1][2] += 1
        else:
            runs.append([source, channel, 1])
    graph, parts = base.graph, []
    for k, (source, start, length) in enumerate(runs):
        with graph.inserting_after(after):
            after = call(torch.narrow, (source, axis, start, length), f"{'bypass' if source is base else 'joined'}_{k}")
        parts.append(after)
    with graph.inserting_after(after):
        fused = call(torch.cat, (parts, axis), "fuse")
    return fused, next(p for p in parts if p.args[0] is base)


def _as_dtype_of(graph: fx.Graph, fused: fx.Node, out: fx.Node, slug: str, added: list[str]) -> fx.Node:
    """``fused.to(out.dtype)``: under autocast, the bypass keeps the base's dtype and a new
    transition conv computes in the low one, so the concat could differ from the dtype the
    stage's output had (that of its through output, ``out``); outside autocast a no-op.
    The dtype is read right after ``out``, so that reading it keeps no tensor alive longer."""
    with graph.inserting_after(out):
        dtype = graph.create_node("call_function", getattr, (out, "dtype"), name=f"{slug}_dtype")
    with graph.inserting_after(fused):
        cast = graph.create_node("call_method", "to", (fused, dtype), name=f"{slug}_as_dtype")
    added += [dtype.name, cast.name]
    return cast


def _narrow_layers(gm: fx.GraphModule, plan: StagePlan, nodes: dict[str, fx.Node]) -> None:
    """Put the narrowed copy of every layer and parameter the plan narrows in its place."""
    for narrowing in plan.narrowings:
        node = nodes[narrowing.node]
        owner, _, attr = node.target.rpartition(".")
        if node.op == "get_attr":
            module = gm.get_submodule(owner)
            replace_tensor(module, attr, narrow_tensor(getattr(module, attr), narrowing.axis, narrowing.out_keep))
            continue
        layer = gm.get_submodule(node.target)
        narrowed = narrow_layer(rule_for(node, gm).narrow, layer, narrowing.in_keep, narrowing.out_keep)
        setattr(gm.get_submodule(owner), attr, narrowed)


def _partial_transition(gm, source, mix, out_channels, templates, home, added):
    """The new pointwise layer ``mix`` after ``source``, then the template norm (fresh) and
    activation (fresh where it has parameters per channel, else copied), each
    ``out_channels`` wide; returns the last node."""
    graph = gm.graph
    norm_node, act_node = templates
    device = device_of(gm)
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    container = nn.Module()
    container.conv = mix
    if norm_node is not None:
        container.norm = fresh_like(gm.get_submodule(norm_node.target), out_channels)
    if act_node is not None and act_node.op == "call_module":
        container.act = sized_like(gm.get_submodule(act_node.target), out_channels)
    for module in container.modules():
        if getattr(module, "inplace", False):  # an in-place act would overwrite what autograd saved
            module.inplace = False
    gm.add_submodule(home, container.to(device=device, dtype=dtype).train(gm.training))  # in the model's mode

    last = source
    for child in ("conv", "norm", "act"):
        if hasattr(container, child):
            with graph.inserting_after(last):
                last = graph.create_node("call_module", f"{home}.{child}", (last,), name=f"{home}_{child}".replace(".", "_"))
            added.append(last.name)
    if act_node is not None and act_node.op != "call_module":
        with graph.inserting_after(last):
            args = (last, *act_node.args[1:])
            kwargs = {k: v for k, v in act_node.kwargs.items() if k != "inplace"}
            last = graph.create_node(act_node.op, act_node.target, args, kwargs, name=f"{home}_act".replace(".", "_"))
        added.append(last.name)
    return last


def _home(gm: fx.GraphModule, stage_name: str, slug: str) -> str:
    """Where a stage's new layers live: ``<stage module>.csp_transition``, else top level."""
    try:
        gm.get_submodule(stage_name)
        prefix = f"{stage_name}."
    except AttributeError:
        prefix = f"csp_{slug}_"
    name, i = f"{prefix}csp_transition", 1
    while _exists(gm, name):
        i += 1
        name = f"{prefix}csp_transition{i}"
    return name


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
        return True
    except AttributeError:
        return False
