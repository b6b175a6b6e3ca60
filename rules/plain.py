"""Plain stages: maximal chains of conv layers of one width and one resolution, with no
shortcut: a VGG stage, the conv stack of a detector's head, an FPN's output convs.

A unit is a conv followed by the norm, activation and identity-like ops (a dropout) that
are each its single user. Units chain when a unit's output feeds only the next unit's
conv. A plain stage is a chain of at least two units whose outputs all have one shape,
the same resolution as the chain's input (so the bypass can join the output); the first
conv may change the resolution or the width. The base is the first conv's input, or, where
the first conv changes either, its output (a bypass carries features at the stage's width).

Its width lives in its convs, not in its base: every conv of the chain is in
``Stage.inner``, so the partial stage runs at ``1 - gamma`` of the chain's width, as
YOLOv5's C3 with ``shortcut=False`` and Scaled-YOLOv4's CSP-ized PAN run their plain conv
stacks on half the channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from cspify.channels import stream_axis
from cspify.graph import shape
from cspify.ops import role_of
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


@register("plain", "conv chains of one width", priority=2)
def find(traced: Traced) -> list[Stage]:
    gm, nodes = traced.gm, traced.nodes
    units = {
        node.name: unit for node in gm.graph.nodes
        if node.op == "call_module" and role_of(node, gm) == "conv" and (unit := _unit_at(traced, node)) is not None
    }

    def next_of(unit: Unit) -> Unit | None:
        """The unit whose conv alone reads this unit's output, where its output keeps the shape."""
        users = nodes[unit.output].users
        nxt = units.get(next(iter(users)).name) if len(users) == 1 else None
        return nxt if nxt is not None and shape(nodes[nxt.output]) == shape(nodes[unit.output]) else None

    followed = {nxt.conv for unit in units.values() if (nxt := next_of(unit)) is not None}
    stages = []
    for start in units.values():
        if start.conv in followed:
            continue  # not the first unit of its chain
        chain = [start]
        while (nxt := next_of(chain[-1])) is not None:
            chain.append(nxt)
        stage = _stage(traced, chain)
        if stage is not None:
            stages.append(stage)
    return stages


def _axis(traced: Traced, chain: list[Unit]) -> tuple[int | None, str]:
    return stream_axis(traced, [n for unit in chain for n in unit.nodes], chain[0].input)


def _width(node, axis: int) -> int | None:
    dims = shape(node)
    return dims[axis] if dims is not None and axis < len(dims) else None


def _stage(traced: Traced, chain: list[Unit]) -> Stage | None:
    """The chain as a plain stage (None below two units). Where the first conv changes the
    resolution (a strided conv), the bypass could not join the output; where it changes the
    width (a VGG's first conv, reading the 3 channels of the input image), the bypass would
    carry the base's own channels, not features at the stage's width: in both cases the
    chain starts after it, with its output as the base."""
    nodes = traced.nodes
    first = chain[0]
    if shape(nodes[first.input]) is None or len(shape(nodes[first.input])) != len(shape(nodes[first.output])):
        chain = chain[1:]
    elif any(a != b for a, b in list(zip(shape(nodes[first.input]), shape(nodes[first.output])))[2:]):
        chain = chain[1:]  # spatial axes differ (channels-first layout: convs read axis 1)
    if len(chain) < 2:
        return None
    axis, problem = _axis(traced, chain)
    if axis is not None and len(chain) > 1 and _width(nodes[chain[0].input], axis) != _width(nodes[chain[0].output], axis):
        chain = chain[1:]  # the first conv makes the stage's width: its output is the base
        axis, problem = _axis(traced, chain)
    if len(chain) < 2:
        return None
    base = nodes[chain[0].input]
    blocks = [unit.nodes for unit in chain]
    return Stage(
        name="",
        kind="plain",
        base=base.name,
        blocks=tuple(blocks),
        output=chain[-1].output,
        channels=shape(base)[axis] if axis is not None else 0,
        channel_axis=axis,
        axis_problem=problem,
        inner=tuple(unit.conv for unit in chain),
    )
