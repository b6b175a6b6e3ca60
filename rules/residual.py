"""Residual stages: maximal chains of identity-shortcut blocks ``y = act?(x + f(x))``.

A block is an add whose two inputs are a tensor x (possibly through ops that act on every
channel alike: an ``nn.Identity`` shortcut, a dropout, a scaling ``x * 0.5``) and a branch
f(x) computed from x alone (single entry, single exit), all three of one shape: same
channels, same resolution.
An activation right after the add belongs to the block (post-activation, ResNet); without
one the add is the block's last op (pre-activation). Blocks chain when one block's output
feeds only the next block. The base layer is whatever produces the first block's input:
the stage's projection/downsampling block, or the stem. Which axis of it holds the
channels is what the blocks' layers read as channels (``cspify.channels.stream_axis``).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from cspify.channels import stream_axis
from cspify.graph import region_between, shape, single_entry, tensor_inputs, with_constants
from cspify.ops import role_of, rule_for
from cspify.rules import register
from cspify.stage import Stage
from cspify.trace import Traced

COMPUTE_ROLES = ("conv", "linear")


def _alike_on_channels(node, gm) -> bool:
    """An op on the shortcut that commutes with the channel split, as it acts on every
    channel alike: an identity (``nn.Identity``, a dropout), or an elementwise op whose
    other arguments are numbers (``x * 0.5``, ``x / 2``), not in place."""
    op = rule_for(node, gm)
    if op is None or len(tensor_inputs(node)) != 1:
        return False
    if op.role == "identity":
        return True
    others = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others)
    return op.role in ("elementwise", "add") and op.returns != "inplace" and numbers


@dataclass(frozen=True)
class Block:
    input: str
    nodes: tuple[str, ...]
    output: str


def _block_at(traced: Traced, add, order) -> Block | None:
    """The identity-shortcut block that ends in ``add``, if it is one."""
    gm, nodes, live = traced.gm, traced.nodes, traced.live
    inputs = tensor_inputs(add)
    if len(inputs) != 2 or shape(add) is None or len(shape(add)) < 3:
        return None
    for x, branch in (inputs, inputs[::-1]):
        skip = []  # ops on the shortcut that act on every channel alike (an nn.Identity shortcut, x * 0.5)
        while _alike_on_channels(x, gm) and len(x.users) == 1:
            skip.append(x.name)
            x = tensor_inputs(x)[0]
        if shape(x) != shape(add) or shape(branch) != shape(add) or x is branch:
            continue
        if not nx.has_path(traced.graph, x.name, branch.name):
            continue
        body = region_between(traced.graph, x.name, branch.name)
        if not single_entry(traced, body, x.name):
            continue
        exits = (u for n in body for u in nodes[n].users if u is not add and u.name not in body and u.name in live)
        if any(exits) or set(skip) & body:
            continue
        if not any(role_of(nodes[n], gm) in COMPUTE_ROLES for n in body):
            continue
        members = with_constants(traced, body) | {add.name} | set(skip)
        output = add
        users = list(add.users)
        if len(users) == 1 and role_of(users[0], gm) == "act" and tensor_inputs(users[0]) == [add]:
            output = users[0]
            members.add(output.name)
        return Block(x.name, tuple(sorted(members, key=order.__getitem__)), output.name)
    return None


@register("residual")
def find(traced: Traced) -> list[Stage]:
    gm, nodes = traced.gm, traced.nodes
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    by_input: dict[str, Block] = {}
    for node in gm.graph.nodes:
        if role_of(node, gm) == "add":
            block = _block_at(traced, node, order)
            if block is not None:
                by_input.setdefault(block.input, block)

    def follows(prev: Block, nxt: Block) -> bool:
        return all(user.name in nxt.nodes for user in nodes[prev.output].users)

    by_output = {block.output: block for block in by_input.values()}
    starts = [
        b for b in by_input.values()
        if b.input not in by_output or not follows(by_output[b.input], b)
    ]
    stages = []
    for start in sorted(starts, key=lambda b: order[b.output]):
        chain = [start]
        while chain[-1].output in by_input and follows(chain[-1], by_input[chain[-1].output]):
            chain.append(by_input[chain[-1].output])
        base = nodes[start.input]
        blocks = tuple(block.nodes for block in chain)
        axis, problem = stream_axis(traced, [n for block in blocks for n in block], base.name)
        stages.append(
            Stage(
                name="",
                kind="residual",
                base=base.name,
                blocks=blocks,
                output=chain[-1].output,
                channels=shape(base)[axis] if axis is not None else 0,
                channel_axis=axis,
                axis_problem=problem,
            )
        )
    return stages
