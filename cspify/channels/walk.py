"""The walk: ``analyse`` couples the nodes of a region in graph order, from a seed tensor.

The seed's channels (a stage's base output: the stream) are space 0. Each node is coupled
by the function the op table names for it (``cspify.channels.couplings``); tensors that
enter the region from elsewhere keep their widths. Last, slices that together take each
channel of a tensor once (``x[:, :c]`` and ``x[:, c:]``) split it as a chunk would.

    a = analyse(traced, stage.nodes, seed=stage.base, seed_axis=stage.channel_axis)
    a.spaces[a.info[stage.base].space].width        # 256: the stream width
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

from cspify.channels.analysis import Analysis, ChannelInfo
from cspify.channels.couplings import COUPLINGS, couple_getitem, couple_reshape, couple_unknown
from cspify.graph import shape
from cspify.ops import rule_for

if TYPE_CHECKING:
    from cspify.trace import Traced


def analyse(traced: Traced, region, seed: str, seed_axis: int = 1) -> Analysis:
    """Channel spaces of a region, in graph order, with ``seed``'s channels as space 0.

    Tensors that enter the region from elsewhere keep their width (their spaces are frozen
    with the reason), as does anything an op without a rule touches.
    """
    a = Analysis(traced)
    nodes = traced.nodes
    seed_node = nodes[seed]
    a.info[seed] = ChannelInfo(seed_axis, a.spaces.new(shape(seed_node)[seed_axis]))
    for name in region:
        node = nodes[name]
        if node.op == "get_attr":
            continue  # a parameter gets its channel axis where it is used (Analysis.of, couple_same)
        op = rule_for(node, traced.gm)
        couple = COUPLINGS[op.couple] if op is not None and op.couple is not None else couple_unknown
        if couple not in (couple_reshape, couple_getitem):
            a.freeze_counts(node)  # a channel count read from a shape, used where cspify does not follow it
        couple(node, a)
    inside = set(region)
    for name in [*a.sizes, *a.shapes]:  # read inside, used outside: the rewrite would change it there
        for user in nodes[name].users:
            if user.name not in inside and user.name in traced.live:
                a.freeze_counts(user)
    _partitions(a)
    return a


def _partitions(a: Analysis) -> None:
    """Slices of a tensor that is no concat, which together take each of its channels once
    (``x[:, :c]`` and ``x[:, c:]``; the full range alone), split it as a chunk would: its
    space becomes their concat, so narrowing them narrows the layer that writes it."""
    by_source: dict[int, dict[tuple[int, int], int]] = {}
    for s in a.slices:
        intervals = by_source.setdefault(a.spaces.find(s.source), {})
        if (s.start, s.stop) in intervals:
            a.spaces.union(intervals[(s.start, s.stop)], s.out)
        else:
            intervals[(s.start, s.stop)] = s.out
    for root, intervals in by_source.items():
        space = a.spaces[root]
        edges = sorted(intervals)
        if space.segments is not None or a.spaces.find(root) != root:
            continue
        covered = edges[0][0] == 0 and edges[-1][1] == space.width
        if not covered or any(first[1] != second[0] for first, second in pairwise(edges)):
            continue
        if len(edges) == 1:
            a.spaces.union(root, intervals[edges[0]])
        else:
            a.spaces.union(root, a.spaces.new(space.width, segments=tuple(intervals[e] for e in edges)))
