"""Dense stages: layers that each read the concatenation of the block input and every
earlier layer's output, as in torchvision's ``_DenseBlock`` (one growing ``torch.cat``
per layer) and in the incremental form ``x = cat([x, f(x)])``.

Channel concatenations are flattened into their leaf lists ``[x0, f1, f2, ...]``; a dense
stage is a family of concats sharing the first leaf x0 whose longest list ``M`` is built
by layers that each read a concat of a prefix of ``M`` (single entry). Its base is x0.
A transition layer right after it (norms, activations, then a 1x1 conv, before any
pooling) is recorded so fusion last can reuse it as the partial transition.

The concats may join along any axis but the batch axis; a family is a dense stage where
that axis is the one its layers read as channels (``cspify.channels.stream_axis``).
"""

from __future__ import annotations

import networkx as nx

from cspify.channels import stream_axis
from cspify.graph import cat_parts, region_between, shape, single_entry, transition_after
from cspify.rules.registry import register
from cspify.stage import Stage
from cspify.trace import Traced


@register("dense", "DenseNet-style concat chains")
def find(traced: Traced) -> list[Stage]:
    gm, graph, nodes = traced.gm, traced.graph, traced.nodes
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    cats = {node.name: found for node in gm.graph.nodes if (found := cat_parts(node)) is not None}

    leaves: dict[str, tuple[str, ...]] = {}
    for name, (parts, dim) in cats.items():  # graph order: inner concats come first
        inner = {p.name for p in parts if p.name in cats and cats[p.name][1] == dim}
        leaves[name] = tuple(leaf for p in parts for leaf in (leaves[p.name] if p.name in inner else (p.name,)))

    families: dict[tuple[str, int], list[str]] = {}
    for name, leaf_list in leaves.items():
        families.setdefault((leaf_list[0], cats[name][1]), []).append(name)

    stages = []
    for (x0, dim), members in families.items():
        longest = max(members, key=lambda m: len(leaves[m]))
        full = leaves[longest]
        members = [m for m in members if full[: len(leaves[m])] == leaves[m]]
        if len(full) < 3 or sum(leaves[m] == full for m in members) != 1:
            continue
        blocks, used, ok, reuses = [], set(), True, False
        for i, feature in enumerate(full[1:], start=1):
            ancestors = nx.ancestors(graph, feature)
            entries = [m for m in members if len(leaves[m]) <= i and m in ancestors]
            entry = max(entries, key=lambda m: len(leaves[m]), default=x0)
            if entry == x0 and x0 not in ancestors:
                ok = False
                break
            region = region_between(graph, entry, feature)
            if not single_entry(traced, region, entry) or region & set(members):
                ok = False
                break
            reuses |= entry != x0 and len(leaves[entry]) >= 2
            block = set(region)
            if entry != x0 and entry not in used:
                block.add(entry)
            used |= block
            blocks.append(block)
        if not ok or not reuses:
            continue
        blocks[-1] |= set(members) - used
        body = set().union(*blocks)
        if any(u.name not in body for n in body - {longest} for u in nodes[n].users):
            continue
        blocks = tuple(tuple(sorted(b, key=order.__getitem__)) for b in blocks)
        axis, problem = stream_axis(traced, [n for block in blocks for n in block], x0)
        if axis is not None and axis != dim:
            continue  # it concatenates along another axis than its layers' channels: no dense stage
        stages.append(
            Stage(
                name="",
                kind="dense",
                base=x0,
                blocks=blocks,
                output=longest,
                channels=shape(nodes[x0])[axis] if axis is not None else 0,
                channel_axis=axis,
                transition=transition_after(traced, nodes[longest], axis) if axis is not None else (),
                axis_problem=problem,
            )
        )
    return stages
