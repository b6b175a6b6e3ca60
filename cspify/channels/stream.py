"""The stream's channel axis: which axis of a stream holds its channels, derived, never assumed.

``stream_axis`` follows every axis of a seed tensor (a stage's base output: the stream)
through the ops that move or keep axes (permutes, reshapes that keep them whole,
elementwise ops, pooling, reductions over other axes, concats: ``AXIS_MOVES``, keyed by
the op table's coupling) to the first layers that read it with a channel axis of their
own (convs, norms, linears). They must agree on one axis, and it must not be the batch's.

    stream_axis(traced, stage.nodes, stage.base)    # (1, ""); (3, "") for a channels-last stream
    axis, why = stream_axis(traced, region, seed)   # (None, "... so which axis holds its channels is not clear")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from cspify.channels.couplings import dims_arg, index_axes, op_name, tuple_shapes
from cspify.graph import cat_args, shape, tensor_inputs
from cspify.ops import channel_dim, rule_for

if TYPE_CHECKING:
    from cspify.trace import Traced


def stream_axis(traced: Traced, region, seed: str) -> tuple[int | None, str]:
    """The axis of ``seed``'s output that the region's layers treat as channels, or None
    and one sentence naming the op that leaves it open.

    ``region`` lists node names in graph order. Every axis of the seed is followed through
    the ops that move or keep axes (permutes, reshapes that keep them whole, elementwise
    ops, pooling, reductions over other axes, concats) to the first layers that read it
    with a channel axis of their own (the op table's ``channel_dim``: convs, norms, linears,
    ``nn.PReLU(C)``), and no further. They must agree on one axis of the seed.
    """
    nodes, gm = traced.nodes, traced.gm
    axes: dict[str, tuple[int | None, ...]] = {seed: tuple(range(len(shape(nodes[seed]) or ())))}
    readers: dict[int, str] = {}  # seed axis -> the first layer that reads it as channels
    stop = None  # the first op that the axes are not followed through
    for name in region:
        node = nodes[name]
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if shape(node) is None and tuple_shapes(node) is None:
            continue
        if not any(arg.name in axes for arg in node.all_input_nodes):  # a chunk's pieces included
            continue
        dim = channel_dim(node, gm)
        if dim is not None:  # a layer with a channel axis of its own: it decides for this path
            read = axes.get(node.args[0].name, ())
            if dim < len(read) and read[dim] is not None:
                readers.setdefault(read[dim], name)
            continue
        op = rule_for(node, gm)
        move = AXIS_MOVES.get(op.couple) if op is not None else None
        moved = move(node, axes) if move is not None else None
        if moved is not None and any(d is not None for d in moved):
            axes[name] = moved
        elif stop is None and (op is None or op.couple is None):
            stop = f"op '{op_name(node, gm)}' (node '{name}') has no channel rule"
        elif stop is None and op.couple != "nothing":
            stop = f"'{name}' mixes its axes"
    if len(readers) > 1:
        (axis, first), (other, second) = list(readers.items())[:2]  # in graph order
        return None, (
            f"'{first}' treats axis {axis} of its stream as channels but '{second}' treats axis {other} as channels, "
            "so which axis holds its channels is not clear"
        )
    if not readers:
        before = f"{stop}, and before it " if stop else ""
        return None, f"{before}no conv, norm or linear layer reads its stream, so which axis holds its channels is not clear"
    axis, reader = next(iter(readers.items()))
    if axis == 0:
        return None, f"'{reader}' treats axis 0 of its stream, the batch axis, as channels"
    return axis, ""


def _broadcast_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...] | None:
    """Elementwise ops: each output axis is the inputs' axis there (aligned from the right,
    a broadcast size 1 aside); where two inputs bring different axes, none."""
    out = shape(node)
    found: list = [None] * len(out)
    for arg in tensor_inputs(node):
        if arg.name not in axes:
            continue
        dims, offset = shape(arg), len(out) - len(shape(arg))
        for i, label in enumerate(axes[arg.name]):
            j = i + offset
            if j < 0 or label is None or (dims[i] == 1 and out[j] != 1):
                continue
            found[j] = label if found[j] in (None, label) else -1
    return tuple(None if label == -1 else label for label in found)


def _permuted_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...]:
    """permute / transpose: the axes go where the permutation puts them."""
    before = axes[node.args[0].name]
    rank = len(before)
    if node.target in ("transpose", torch.transpose):
        d0, d1 = (d % rank for d in dims_arg(node))
        order = list(range(rank))
        order[d0], order[d1] = d1, d0
    else:
        order = [d % rank for d in dims_arg(node)]
    return tuple(before[d] for d in order)


def _reshaped_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...]:
    """An axis survives a reshape where it keeps its size and everything before it keeps
    its total size."""
    before, after = shape(node.args[0]), shape(node)
    found: list = [None] * len(after)
    for i, label in enumerate(axes[node.args[0].name]):
        lead = math.prod(before[:i])
        j = next((j for j in range(len(after)) if math.prod(after[:j]) == lead and after[j] == before[i]), None)
        if j is not None and found[j] is None:
            found[j] = label
    return tuple(found)


def _reduced_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...] | None:
    """mean / sum / amax over some dims: the others survive (in place, with keepdim)."""
    before = axes[node.args[0].name]
    rank_in, rank_out = len(before), len(shape(node))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = {d % rank_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if rank_out == rank_in:
        return tuple(None if i in dims else label for i, label in enumerate(before))
    return tuple(label for i, label in enumerate(before) if i not in dims)


def _first_input(move):
    """A move of the first argument's axes; None where that argument is not followed."""

    def moved(node: fx.Node, axes: dict):
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first.name not in axes or shape(node) is None:
            return None
        return move(node, axes)

    return moved


def _catted_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...] | None:
    """A concat: each axis is its parts' (none where two parts bring different axes)."""
    parts, _ = cat_args(node)
    out = shape(node)
    if not isinstance(parts, (list, tuple)):
        return None
    followed = [p for p in parts if isinstance(p, fx.Node) and p.name in axes and len(shape(p)) == len(out)]
    if not followed:
        return None
    found = list(axes[followed[0].name])
    for part in followed[1:]:
        found = [a if a == b else None for a, b in zip(found, axes[part.name])]
    return tuple(found)


def _indexed_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...] | None:
    """getitem: a piece of a chunk or split has its input's axes; a tensor index keeps the
    axes it slices (and drops those it takes one entry of)."""
    source, index = (node.args + (None, None))[:2]
    before = axes[source.name]
    dims = shape(source)
    if dims is None:
        return before if isinstance(index, int) and tuple_shapes(source) is not None else None
    found = index_axes(index, len(dims))
    if found is None:
        return None
    after: list = [None] * len(shape(node))
    for label, (_, _, axis) in zip(before, found):
        if axis is not None:
            after[axis] = label
    return tuple(after)


def _split_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...] | None:
    """chunk / split: every piece has its input's axes."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or source.name not in axes or tuple_shapes(node) is None:
        return None
    return axes[source.name]


# How each coupling moves the axes of what it reads (``stream_axis``); ops of another
# coupling are not followed.
AXIS_MOVES: dict[str, Callable[[fx.Node, dict], tuple[int | None, ...] | None]] = {
    "same": _broadcast_axes,
    "permute": _first_input(_permuted_axes),
    "reshape": _first_input(_reshaped_axes),
    "reduce": _first_input(_reduced_axes),
    "cat": _catted_axes,
    "getitem": _first_input(_indexed_axes),
    "split": _split_axes,
}
