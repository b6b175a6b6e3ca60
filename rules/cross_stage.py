"""Stages that are already the through part of a cross stage partial block.

YOLOv8's C2f, YOLOv5's C3, timm's CrossStage blocks and ShuffleNet v2's units split a
feature map, run one part through blocks and concatenate it with the other part: the
blocks inside are found as residual or plain stages, and converting them would nest a
second CSP in the first. A residual or plain stage is already cross stage partial when the
first concat its output reaches (through at most a transition's few layers) also joins a
part that bypassed it, coming from the same split:

- **a channel split**: the other part is a piece of a ``chunk``/``split`` (or a channel
  slice) whose input the stage's base is computed from (C2f, CrossStage, ShuffleNet v2);
- **two convs of one input**: the stage's base and the other part are each a 1x1 conv's
  output (with its norm and activation) reading the same tensor, or the other part is a
  1x1 conv of the base itself (a stage that starts at the split conv), and a 1x1 conv fuses
  the concat (C3, BottleneckCSP).

    mark(traced, stages)   # each such stage with ``Stage.cross_stage`` saying where it lies

The planner leaves such a stage unless the user names it (``--stage``) to nest anyway.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import networkx as nx
import torch
import torch.fx as fx

from cspify.graph import cat_args, shape
from cspify.ops import role_of
from cspify.stage import Stage
from cspify.trace import Traced

SPLITS = {torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"}
HOPS = 4  # layers a stage's output may pass (its part's transition) before the concat
FOLLOWERS = ("norm", "act", "identity")


def mark(traced: Traced, stages: list[Stage]) -> list[Stage]:
    """``stages`` with ``cross_stage`` set on those already inside a CSP block."""
    return [_marked(traced, s) if s.kind in ("residual", "plain") else s for s in stages]


def _marked(traced: Traced, stage: Stage) -> Stage:
    cat = _concat_after(traced, traced.nodes[stage.output])
    if cat is None or not _joins_channels(stage, traced.nodes[stage.output], cat):
        return stage
    base, graph = traced.nodes[stage.base], traced.graph
    after = nx.descendants(graph, stage.output) | {stage.output}
    for part in cat.args[0]:
        if not isinstance(part, fx.Node) or part.name in after:
            continue
        source = _split_source(part)
        if source is not None and (source is base or nx.has_path(graph, source.name, base.name)):
            return replace(stage, cross_stage=f"it is already the through part of a cross stage partial block "
                                              f"(its output joins '{part.name}', split from '{source.name}', in '{cat.name}')")
        x = _pointwise_input(traced, part)
        if x is not None and x is base and _fused(traced, cat):
            return replace(stage, cross_stage=f"it is already the through part of a cross stage partial block "
                                              f"(its output joins '{part.name}', a 1x1 conv of its base "
                                              f"'{x.name}', in '{cat.name}')")
        if x is not None and x is _pointwise_input(traced, base) and _fused(traced, cat):
            return replace(stage, cross_stage=f"it is already the through part of a cross stage partial block "
                                              f"(its output joins '{part.name}', a 1x1 conv of its base's input "
                                              f"'{x.name}', in '{cat.name}')")
    return stage


def _concat_after(traced: Traced, node: fx.Node) -> fx.Node | None:
    """The torch.cat the node's output reaches through at most HOPS single-user layers."""
    for _ in range(HOPS + 1):
        cats = [u for u in node.users if u.op == "call_function" and u.target is torch.cat]
        if cats:
            return cats[0]
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
    return None


def _joins_channels(stage: Stage, output: fx.Node, cat: fx.Node) -> bool:
    """Does the concat join along the stage's channels (same layout, same axis)? A concat
    of tokens (CoaT's class token before its image tokens) is no cross stage partial."""
    _, dim = cat_args(cat)
    rank = len(shape(cat) or ())
    return rank == len(shape(output) or ()) and stage.channel_axis is not None and dim % rank == stage.channel_axis


def _is_split(node) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in SPLITS


def _split_source(part: fx.Node) -> fx.Node | None:
    """The tensor ``part`` is a channel piece of (a chunk's or split's piece, or a slice
    over the channels), or None."""
    if part.op != "call_function" or part.target is not operator.getitem:
        return None
    source, index = part.args[0], part.args[1]
    if _is_split(source):
        return source.args[0]
    channel_slice = isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], slice)
    return source if channel_slice and isinstance(source, fx.Node) else None


def _pointwise_input(traced: Traced, node: fx.Node) -> fx.Node | None:
    """Where ``node`` is a 1x1 conv's output (after its norms and activations), the
    conv's input; else None."""
    gm = traced.gm
    while role_of(node, gm) in FOLLOWERS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op != "call_module" or role_of(node, gm) != "conv":
        return None
    conv = gm.get_submodule(node.target)
    return node.args[0] if all(k == 1 for k in conv.kernel_size) and isinstance(node.args[0], fx.Node) else None


def _fused(traced: Traced, cat: fx.Node) -> bool:
    """A 1x1 conv reads the concat (after its norms and activations), and nothing else does."""
    node = cat
    while len(node.users) == 1:
        user = next(iter(node.users))
        if role_of(user, traced.gm) in FOLLOWERS:
            node = user
            continue
        return _pointwise_input(traced, user) is node
    return False
