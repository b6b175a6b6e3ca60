"""Aggregation stages: layers in a chain whose outputs are concatenated once, then fused by
a 1x1 conv, as in VoVNet's one-shot aggregation (OSA), SelecSLS and ELAN-like blocks.

    x0 ─ f1 ─ f2 ─ ... ─ fk
    cat([x0?, f1, f2, ..., fk, other?]) ─ 1x1 conv ─▶

A channel concat is an aggregation stage when the parts computed from its first layer's
input x0 form a chain of at least two layers: f1 reads x0 alone, each next layer reads the
one before alone (single entry), and each fi feeds nothing but the next layer and the
concat. The concat may hold x0 itself (VoVNet) and parts from outside the block (SelecSLS'
skip from the stage's first block), which stay whole. The transition after it is found as
for dense stages. The base is x0; the layers' convs are ``Stage.inner``, so the partial
stage runs them at ``1 - gamma`` of their width, as CSPOSANet does.
"""

from __future__ import annotations

import networkx as nx

from cspify.channels import stream_axis
from cspify.graph import cat_parts, region_between, shape, single_entry, transition_after
from cspify.ops import role_of
from cspify.rules.registry import register
from cspify.stage import Stage
from cspify.trace import Traced

COMPUTE_ROLES = ("conv", "linear")
NEAREST = 16  # how many of the first layer's nearest ancestors are tried as its entry


def _computes(traced: Traced, region: set[str]) -> bool:
    return any(role_of(traced.nodes[n], traced.gm) in COMPUTE_ROLES for n in region)


def _entry(traced: Traced, first: str, order: dict[str, int]) -> str | None:
    """The nearest node the first layer is computed from alone (with a conv on the way)."""
    ancestors = sorted(nx.ancestors(traced.graph, first) - traced.constant, key=order.__getitem__, reverse=True)
    for entry in ancestors[:NEAREST]:
        if shape(traced.nodes[entry]) is None:
            continue
        region = region_between(traced.graph, entry, first)
        if single_entry(traced, region, entry) and _computes(traced, region):
            return entry
    return None


@register("aggregation", "layer chains concatenated once", priority=1)
def find(traced: Traced) -> list[Stage]:
    gm, graph = traced.gm, traced.graph
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    descendants: dict[str, set[str]] = {}  # parts recur across concats (DenseNet's): computed once each

    def reach(name: str) -> set[str]:
        if name not in descendants:
            descendants[name] = nx.descendants(graph, name)
        return descendants[name]

    stages = []
    for cat in gm.graph.nodes:
        found = cat_parts(cat)
        if found is None:
            continue
        parts = [p.name for p in found[0]]
        if len(set(parts)) != len(parts):
            continue
        layers = [p for p in parts[1:] if p in reach(parts[0])]  # x0 is the first part (VoVNet) ...
        if len(layers) < 2:  # ... or the input of the first layer (x0 not concatenated)
            layers = [p for p in parts if any(p in reach(q) for q in parts if q != p)]
        stage = _stage_at(traced, cat.name, parts, layers, order) if len(layers) >= 2 else None
        if stage is not None:
            stages.append(stage)
    return stages


def _stage_at(traced: Traced, cat: str, parts: list[str], layers: list[str], order: dict[str, int]) -> Stage | None:
    """The stage ending in ``cat`` whose layers are ``layers`` (parts computed from other
    parts), or None where they are no chain."""
    graph, nodes = traced.graph, traced.nodes
    layers = sorted(layers, key=order.__getitem__)
    x0 = parts[0] if parts[0] not in layers and nx.has_path(graph, parts[0], layers[0]) else _entry(traced, layers[0], order)
    if x0 is None:
        return None
    blocks, entry = [], x0
    for layer in layers:
        if not nx.has_path(graph, entry, layer):
            return None
        region = region_between(graph, entry, layer)
        if not single_entry(traced, region, entry) or not _computes(traced, region):
            return None
        blocks.append(region)
        entry = layer
    body = set().union(*blocks)
    for i, layer in enumerate(layers):
        ahead = blocks[i + 1] if i + 1 < len(layers) else set()
        if any(u.name != cat and u.name not in ahead for u in nodes[layer].users):
            return None
    if any(u.name not in body and u.name != cat for n in body - set(layers) for u in nodes[n].users):
        return None
    blocks[-1] = blocks[-1] | {cat}
    blocks = tuple(tuple(sorted(b, key=order.__getitem__)) for b in blocks)
    axis, problem = stream_axis(traced, [n for block in blocks for n in block], x0)
    if axis is not None and axis != _dim(nodes[cat]):
        return None
    inner = tuple(n for n in sorted(body, key=order.__getitem__) if role_of(nodes[n], traced.gm) in COMPUTE_ROLES)
    return Stage(
        name="",
        kind="aggregation",
        base=x0,
        blocks=blocks,
        output=cat,
        channels=shape(nodes[x0])[axis] if axis is not None else 0,
        channel_axis=axis,
        transition=transition_after(traced, nodes[cat], axis) if axis is not None else (),
        axis_problem=problem,
        inner=inner,
    )


def _dim(cat) -> int:
    return cat_parts(cat)[1]
