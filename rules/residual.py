"""Residual stages: maximal chains of identity-shortcut blocks ``y = act?(x + f(x))``.

A block is an add whose inputs are a tensor x (possibly through ops that act on every
channel alike: an ``nn.Identity`` shortcut, a dropout, a scaling ``x * 0.5``, or a layer with
parameters per channel, RepVGG's BatchNorm identity branch, narrowed with the stream) and
branches computed from x alone (single entry, single exit), all of one shape: same
channels, same resolution. Adds nested in the block's add make one block with several
branches: ``x + f(x) + g(x)``, RepVGG's ``(conv_1x1(x) + conv_kxk(x)) + bn(x)``.
An activation right after the add (or after ops that pass it on, an ``nn.Identity``
attention) belongs to the block (post-activation, ResNet); without one the add is the
block's last op (pre-activation).

A *partial* residual adds x to the first C channels of a wider branch output only, as
ReXNet does: ``cat([y[:, :C] + x, y[:, C:]], 1)`` with ``y = f(x)``; the concat is the
block's output, wider than its input, and the stream grows block by block.

Blocks chain when one block's output feeds only the next block. The base layer is whatever
produces the first block's input: the stage's projection/downsampling block, or the stem.
Which axis of it holds the channels is what the blocks' layers read as channels
(``cspify.channels.stream_axis``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from cspify.channels import index_axes, stream_axis
from cspify.graph import cat_args, region_between, shape, single_entry, tensor_inputs, with_constants
from cspify.ops import role_of, rule_for
from cspify.rules.registry import register
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


def _on_shortcut(node, gm) -> bool:
    """An op a shortcut may pass on its way to the add: one acting on every channel alike,
    or a layer with its parameters per channel (a BatchNorm: RepVGG's identity branch),
    which the block owns and narrows with the stream."""
    if _alike_on_channels(node, gm):
        return True
    op = rule_for(node, gm)
    return (
        node.op == "call_module" and op is not None and op.role == "norm" and op.couple == "same"
        and op.narrow == "per_channel" and len(tensor_inputs(node)) == 1
    )


def _add_tree(add: fx.Node, gm) -> tuple[list[fx.Node], set[str]]:
    """The leaves of the adds nested in ``add`` (an add of two tensors of its shape that only
    this tree reads, reached through ops on every channel alike), and the tree's inner nodes."""
    leaves, inner = [], set()

    def visit(node: fx.Node) -> None:
        for arg in tensor_inputs(node):
            path, found = [], arg
            while _alike_on_channels(found, gm) and len(found.users) == 1:
                path.append(found.name)
                found = tensor_inputs(found)[0]
            terms = tensor_inputs(found)
            nested = (
                role_of(found, gm) == "add" and len(found.users) == 1 and len(terms) == 2
                and all(shape(term) == shape(add) for term in terms)  # not a bias added to a tensor
            )
            if nested:
                inner.update(path, {found.name})
                visit(found)
            else:
                leaves.append(arg)

    visit(add)
    return leaves, inner


def channel_slice(node: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """(source, axis, start, stop) where ``node`` is ``source[..., start:stop, ...]``: a
    getitem that slices one axis with step 1 and keeps the others whole; else None."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    source, index = node.args
    dims, out = (shape(source), shape(node)) if isinstance(source, fx.Node) else (None, None)
    axes = index_axes(index, len(dims)) if dims is not None and out is not None and len(dims) == len(out) else None
    if axes is None or not all(isinstance(entry, slice) for _, entry, _ in axes):
        return None
    bounds = [entry.indices(width) for (_, entry, _), width in zip(axes, dims)]
    cut = [(axis, found) for axis, (found, width) in enumerate(zip(bounds, dims)) if found != (0, width, 1)]
    if len(cut) != 1 or cut[0][1][2] != 1:
        return None
    axis, (start, stop, _) = cut[0]
    return source, axis, start, stop


def _partial_tail(add: fx.Node, branch: fx.Node, body: set[str], x: fx.Node) -> set[str] | None:
    """A partial residual (ReXNet): ``branch`` is ``y[:, :C]`` of a wider y in the body, x
    has C channels, and the add joins the rest of y in one concat along that axis,
    ``cat([y[:, :C] + x, y[:, C:]])``. Returns the slices of the rest and the concat (its
    last node), or None."""
    found = channel_slice(branch)
    if found is None:
        return None
    y, axis, start, stop = found
    if y.name not in body or start != 0 or stop != shape(x)[axis] or len(add.users) != 1:
        return None
    cat = next(iter(add.users))
    parts, dim = cat_args(cat)
    if cat.op != "call_function" or not isinstance(parts, (list, tuple)) or not parts or parts[0] is not add:
        return None
    if not isinstance(dim, int) or dim % len(shape(cat)) != axis:
        return None
    offset, rest = stop, []
    for part in parts[1:]:
        piece = channel_slice(part) if isinstance(part, fx.Node) else None
        if piece is None or piece[0] is not y or piece[1] != axis or piece[2] != offset or len(part.users) != 1:
            return None
        offset = piece[3]
        rest.append(part.name)
    if offset != shape(y)[axis] or not rest:
        return None
    return {*rest, cat.name}


@dataclass(frozen=True)
class Block:
    input: str
    nodes: tuple[str, ...]
    output: str
    nested: tuple[str, ...] = ()  # the adds nested in its add, and the ops between them


def _block_at(traced: Traced, add, order) -> Block | None:
    """The identity-shortcut block that ends in ``add``, if it is one."""
    gm, nodes, live = traced.gm, traced.nodes, traced.live
    inputs = tensor_inputs(add)
    if len(inputs) != 2 or shape(add) is None or len(shape(add)) < 3:
        return None
    leaves, inner = _add_tree(add, gm)
    for i, x in enumerate(leaves):
        branches = leaves[:i] + leaves[i + 1 :]
        skip = []  # ops on the shortcut (an nn.Identity shortcut, x * 0.5, RepVGG's BatchNorm)
        while _on_shortcut(x, gm) and len(x.users) == 1:
            skip.append(x.name)
            x = tensor_inputs(x)[0]
        if shape(x) != shape(add) or any(shape(b) != shape(add) or b is x for b in branches):
            continue
        if not all(nx.has_path(traced.graph, x.name, b.name) for b in branches):
            continue
        regions = [region_between(traced.graph, x.name, b.name) for b in branches]
        if not all(single_entry(traced, r, x.name) for r in regions):
            continue
        if not all(any(role_of(nodes[n], gm) in COMPUTE_ROLES for n in r) for r in regions):
            continue
        body = set().union(*regions)
        own = body | inner | {add.name}
        exits = {u.name for n in body for u in nodes[n].users if u.name not in own and u.name in live}
        if set(skip) & body:
            continue
        tail = set()
        if exits:
            tail = _partial_tail(add, branches[0], body, x) if len(branches) == 1 else None
            if tail is None or not exits <= tail:
                continue
        last = nodes[max(tail, key=order.__getitem__)] if tail else add
        after = _activation_after(last, gm)
        members = with_constants(traced, body) | inner | {add.name} | set(skip) | tail | {n.name for n in after}
        output = after[-1] if after else last
        return Block(x.name, tuple(sorted(members, key=order.__getitem__)), output.name, tuple(sorted(inner)))
    return None


def _activation_after(last: fx.Node, gm) -> list[fx.Node]:
    """The activation right after a block's add (or a partial residual's concat), with the
    ops that pass it on alike before it (an ``nn.Identity`` attention); none without one."""
    found, node = [], last
    while len(node.users) == 1:
        user = next(iter(node.users))
        if tensor_inputs(user) != [node]:
            break
        found.append(user)
        if role_of(user, gm) == "act":
            return found
        if not _alike_on_channels(user, gm):
            break
        node = user
    return []


@register("residual", "chains of x + f(x) blocks")
def find(traced: Traced) -> list[Stage]:
    gm, nodes = traced.gm, traced.nodes
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    found, nested = [], set()
    for node in reversed(gm.graph.nodes):  # the outermost add of a tree first: its nested adds are its own
        if role_of(node, gm) == "add" and node.name not in nested:
            block = _block_at(traced, node, order)
            if block is not None:
                found.append(block)
                nested.update(block.nested)
    inside = {n for block in found for n in block.nodes if n != block.output}
    by_input: dict[str, Block] = {}
    for block in reversed(found):
        if block.output not in inside:  # a block inside another's branch is that branch's, not a stage of its own
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
