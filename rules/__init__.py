"""Stage patterns. Each rule is one function ``find(traced) -> list[Stage]`` in a file of
its own, registered here under its kind; adding a pattern is adding one entry.

    from cspify import rules
    stages = rules.find_stages(traced)    # every rule, named, in graph order

Rules find stages by graph structure only (adds, concats, shapes, reachability), never by
module names; names are given afterwards from the modules a stage contains.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from cspify.stage import Stage
from cspify.trace import Traced

PATTERNS: dict[str, Callable[[Traced], list[Stage]]] = {}


def register(kind: str):
    """Decorator: make ``find`` the rule for stages of ``kind``."""

    def add(find: Callable[[Traced], list[Stage]]):
        PATTERNS[kind] = find
        return find

    return add


def find_stages(traced: Traced) -> list[Stage]:
    """Run every rule; drop stages that overlap an earlier one; name them; graph order."""
    order = {node.name: i for i, node in enumerate(traced.gm.graph.nodes)}
    found = [stage for find in PATTERNS.values() for stage in find(traced)]
    found.sort(key=lambda s: order[s.output])
    taken: set[str] = set()
    stages = []
    for stage in found:
        if taken.isdisjoint(stage.nodes):
            taken.update(stage.nodes)
            stages.append(stage)
    return _name(traced, stages)


def _name(traced: Traced, stages: list[Stage]) -> list[Stage]:
    """Name each stage after the module holding its blocks (``layer1``), else ``stageN``.

    Stages that share that module (blocks laid out flat in one Sequential) add the range
    of children they span: ``features.1-4``.
    """
    nodes = traced.nodes

    def paths(names):
        return [nodes[n].target.split(".") for n in names if nodes[n].op == "call_module"]

    def prefix(names):
        found = paths(names)
        return os.path.commonprefix(found) if found else []

    bodies = [[n for block in stage.blocks for n in block] for stage in stages]
    shared = Counter(".".join(prefix(body)) for body in bodies)
    named, used = [], set()
    for i, (stage, body) in enumerate(zip(stages, bodies), start=1):
        parts = prefix(body)
        if len(stage.blocks) == 1:
            parts = prefix(body + [stage.base]) or parts
        name = ".".join(parts)
        if name and shared[".".join(prefix(body))] > 1:
            children = [p[len(parts)] for p in paths(body) if len(p) > len(parts)]
            if children:
                name = f"{name}.{children[0]}-{children[-1]}"
        name = name or f"stage{i}"
        if name in used:
            name = f"{name}#{i}"
        used.add(name)
        named.append(replace(stage, name=name))
    return named


# The rules register themselves on import.
from cspify.rules import dense, residual  # noqa: E402,F401
