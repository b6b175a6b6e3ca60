"""Plain stages: runs of conv layers at one resolution with no shortcut, whose output has
the shape of their input: a VGG stage, the conv stack of a detector's head, an FPN's
output convs, YOLOv3's five-conv sets (1x1 and 3x3 convs alternating between two widths).

A unit is a conv followed by the norm, activation and identity-like ops (a dropout) that
are each its single user. Units chain when a unit's output feeds only the next unit's
conv and the two outputs differ at most along one axis (the width: a strided conv, which
changes the resolution, ends a chain). A plain stage is a run of at least two units of a
chain whose last output has the shape of its base: the first unit's input, or the output of
the unit before the run (so a first conv that changes the width or the resolution makes the
base, and the bypass carries features at the stage's width). Where that first conv narrows a
concat of pyramid levels (the first conv of a YOLOv3 five-conv set, often the largest layer
of the model), the stage starts at the concat instead: the conv runs on the through part
too, and the parts join by fusion first where the output is not wider than the bypass
(with ``pyramid="maxout"``, each part of the split is compressed: ``cspify.pyramid``). A
chain holds as many stages as fit one after another, longest first from its start.

Its width lives in its convs, not in its base: every conv of the run is in ``Stage.inner``,
so the partial stage runs at ``1 - gamma`` of each conv's width, as YOLOv5's C3 with
``shortcut=False`` and Scaled-YOLOv4's CSP-ized PAN run their plain conv stacks on half the
channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from cspify.channels import stream_axis
from cspify.graph import shape
from cspify.ops import role_of
from cspify.pyramid import fuses_levels
from cspify.rules.registry import register
from cspify.stage import Stage
from cspify.trace import Traced

FOLLOWERS = ("norm", "act", "identity")


@dataclass(frozen=True)
class Unit:
    input: str
    conv: str
    nodes: tuple[str, ...]
    output: str


def _unit_at(traced: Traced, conv) -> Unit | None:
    """The conv, and the norms/activations each the single user of the one before."""
    gm = traced.gm
    inputs = [a for a in conv.args[:1] if hasattr(a, "name")]
    if not inputs or shape(conv) is None or len(shape(conv)) < 3:
        return None
    members, node = [conv.name], conv
    while len(node.users) == 1:
        user = next(iter(node.users))
        if role_of(user, gm) not in FOLLOWERS or not user.args or user.args[0] is not node or shape(user) != shape(node):
            break
        members.append(user.name)
        node = user
    return Unit(inputs[0].name, conv.name, tuple(members), node.name)


@register("plain", "conv chains at one resolution whose output has their input's shape", priority=2)
def find(traced: Traced) -> list[Stage]:
    gm, nodes = traced.gm, traced.nodes
    units = {
        node.name: unit for node in gm.graph.nodes
        if node.op == "call_module" and role_of(node, gm) == "conv" and (unit := _unit_at(traced, node)) is not None
    }

    def next_of(unit: Unit) -> Unit | None:
        """The unit whose conv alone reads this unit's output, at the same resolution."""
        users = nodes[unit.output].users
        nxt = units.get(next(iter(users)).name) if len(users) == 1 else None
        return nxt if nxt is not None and _one_axis_apart(shape(nodes[nxt.output]), shape(nodes[unit.output])) else None

    followed = {nxt.conv for unit in units.values() if (nxt := next_of(unit)) is not None}
    stages = []
    for start in units.values():
        if start.conv in followed:
            continue  # not the first unit of its chain
        chain = [start]
        while (nxt := next_of(chain[-1])) is not None:
            chain.append(nxt)
        stages += [stage for run in _runs(traced, chain) if (stage := _stage(traced, run)) is not None]
    return stages


def _one_axis_apart(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 1


def _runs(traced: Traced, chain: list[Unit]) -> list[list[Unit]]:
    """The runs of at least two units whose last output has the shape of the run's base (the
    input of its first unit): from the chain's start, the longest, then the longest after it.
    Where such a run starts past a conv that narrows a concat of pyramid levels, the run
    starts at that conv instead and goes on to the last output narrower than the concat."""
    nodes, runs, first = traced.nodes, [], 0

    def end(start: int) -> int | None:
        base = shape(nodes[chain[start].input])
        return next((i for i in range(len(chain) - 1, start, -1) if shape(nodes[chain[i].output]) == base), None)

    while first < len(chain) - 1:
        last = end(first)
        if last is None:
            past = end(first + 1)
            wide = shape(nodes[chain[first].input])
            longest = None if past is None or not fuses_levels(nodes[chain[first].input]) else next(
                (i for i in range(len(chain) - 1, past - 1, -1) if _narrower(shape(nodes[chain[i].output]), wide)), None)
            if longest is not None:  # to the last output narrower than the concat
                runs.append(chain[first : longest + 1])
                first = longest + 1
                continue
            first += 1  # this unit's output is the next candidate base
            continue
        runs.append(chain[first : last + 1])
        first = last + 1
    return runs


def _narrower(output, base) -> bool:
    """As large as ``base`` but along one axis (the width), where it is smaller."""
    return _one_axis_apart(output, base) and output != base and all(o <= b for o, b in zip(output, base))


def _axis(traced: Traced, chain: list[Unit]) -> tuple[int | None, str]:
    return stream_axis(traced, [n for unit in chain for n in unit.nodes], chain[0].input)


def _width(node, axis: int) -> int | None:
    dims = shape(node)
    return dims[axis] if dims is not None and axis < len(dims) else None


def _stage(traced: Traced, run: list[Unit]) -> Stage | None:
    """The run as a plain stage (None where its channel axis is not that of its width)."""
    nodes = traced.nodes
    axis, problem = _axis(traced, run)
    base = nodes[run[0].input]
    if axis is not None and _width(base, axis) is None:
        return None
    return Stage(
        name="",
        kind="plain",
        base=base.name,
        blocks=tuple(unit.nodes for unit in run),
        output=run[-1].output,
        channels=shape(base)[axis] if axis is not None else 0,
        channel_axis=axis,
        axis_problem=problem,
        inner=tuple(unit.conv for unit in run),
    )
