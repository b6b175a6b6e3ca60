"""The registry of stage rules: each rule registers its ``find`` under its kind, with a
line that says what it finds; ``find_stages`` runs them and settles overlaps.

    @register("dense", "DenseNet-style concat chains")
    def find(traced: Traced) -> list[Stage]: ...

    find_stages(traced)                          # every kind, named, in graph order
    find_stages(traced, kinds=("residual",))     # one kind only
    DESCRIPTIONS["dense"]                        # 'DenseNet-style concat chains'

Where stages of several kinds share nodes, the kind registered with the lower priority
wins: the paper's residual and dense stages first, then aggregation blocks, then plain
conv chains (a plain chain inside a residual block belongs to the block's stage).
Residual and plain stages that are already the through part of a cross stage partial
block (C2f, C3, CrossStage) are marked (``cross_stage``), and left unless named.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from cspify.rules.cross_stage import mark
from cspify.stage import KINDS, Stage
from cspify.trace import Traced

PATTERNS: dict[str, Callable[[Traced], list[Stage]]] = {}
PRIORITY: dict[str, int] = {}
DESCRIPTIONS: dict[str, str] = {}  # kind -> what its stages are, one line ("chains of x + f(x) blocks")


def register(kind: str, description: str, priority: int = 0):
    """Decorator: make ``find`` the rule for stages of ``kind`` (one of ``stage.KINDS``),
    which ``description`` says in a line; where stages overlap, those of the lower
    ``priority`` keep their nodes (equal priorities: graph order). The paper's kinds have
    priority 0."""
    if kind not in KINDS:
        raise ValueError(f"stage kind {kind!r} is not in cspify.stage.KINDS {KINDS}")

    def add(find: Callable[[Traced], list[Stage]]):
        PATTERNS[kind] = find
        PRIORITY[kind] = priority
        DESCRIPTIONS[kind] = description
        return find

    return add


def find_stages(traced: Traced, kinds: tuple[str, ...] | None = None) -> list[Stage]:
    """Run the rules of ``kinds`` (every rule: None); drop stages that overlap one that
    comes first by priority, then graph order; name them; graph order."""
    order = {node.name: i for i, node in enumerate(traced.gm.graph.nodes)}
    found = [stage for kind in KINDS if kind in PATTERNS and (kinds is None or kind in kinds)
             for stage in PATTERNS[kind](traced)]
    found.sort(key=lambda s: (PRIORITY[s.kind], order[s.output]))
    taken: set[str] = set()
    stages = []
    for stage in found:
        if taken.isdisjoint(stage.nodes):
            taken.update(stage.nodes)
            stages.append(stage)
    stages.sort(key=lambda s: order[s.output])
    return _name(traced, mark(traced, stages))


def _name(traced: Traced, stages: list[Stage]) -> list[Stage]:
    """Name each stage after the module holding its blocks (``layer1``), else ``stageN``.

    Stages that share that module (blocks laid out flat in one Sequential) add the range
    of children they span: ``features.1-4``. Modules called from more than one place (an
    activation shared by every conv) say nothing about where a stage is and are passed over.
    """
    nodes = traced.nodes
    calls = Counter(n.target for n in traced.gm.graph.nodes if n.op == "call_module")

    def paths(names):  # a module called from several places (one shared SiLU) names none of them
        return [nodes[n].target.split(".") for n in names if nodes[n].op == "call_module" and calls[nodes[n].target] == 1]

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
