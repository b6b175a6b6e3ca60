"""Channel spaces: which tensors of a stage must keep equal channel widths.

``analyse`` walks a region of the traced graph in order and groups the tensors whose
channel dimensions must stay equal into *channel spaces* (a union-find), starting from a
seed tensor: a residual stream and everything added to it, a norm and its input, the
segments of a concat. Narrowing a space narrows every layer that reads or writes it.

How each op relates its output channels to its inputs' is one couple function per way
(``COUPLINGS``); which op couples how is the op table's ``couple`` fact (``cspify.ops``).
An op the table has no channel rule for keeps the widths it touches (``couple_unknown``).

    a = analyse(traced, stage.nodes, seed=stage.base, seed_axis=stage.channel_axis)
    a.info["layer1_1_conv1"].reads                  # the space conv1 reads: the stage's stream
    a.spaces[a.info[stage.base].space].width        # 256: the stream's width

Which axis of a stream holds its channels is never assumed: ``stream_axis`` derives it
from the layers that read the stream (convs, norms, linears), through permutes.

    stream_axis(traced, stage.nodes, stage.base)    # (1, ""); (3, "") for a channels-last stream
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn

from cspify.graph import cat_args, shape, tensor_inputs
from cspify.ops import channel_dim, rule_for

if TYPE_CHECKING:
    from cspify.trace import Traced

# ---------------------------------------------------------------------------------------
# Channel spaces


@dataclass
class Space:
    """One union-find entry: a channel dimension shared by several tensors."""

    width: int
    parent: int
    blocks: int = 1  # the width must stay a multiple of this (conv groups, norm groups)
    grouped: str = ""  # a grouped conv that reads or writes it: keeps must be per group
    frozen: str = ""  # why this space must keep its width
    segments: tuple[int, ...] | None = None  # a channel concat of these spaces


class ChannelSpaces:
    """A union-find of channel spaces with widths, group constraints and freeze reasons."""

    def __init__(self) -> None:
        self._spaces: list[Space] = []

    def new(self, width: int, frozen: str = "", segments: tuple[int, ...] | None = None) -> int:
        self._spaces.append(Space(width, len(self._spaces), frozen=frozen, segments=segments))
        return len(self._spaces) - 1

    def find(self, i: int) -> int:
        while self._spaces[i].parent != i:
            self._spaces[i].parent = self._spaces[self._spaces[i].parent].parent
            i = self._spaces[i].parent
        return i

    def __getitem__(self, i: int) -> Space:
        return self._spaces[self.find(i)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self._spaces[ra], self._spaces[rb]
        sb.parent = ra
        sa.blocks = math.lcm(sa.blocks, sb.blocks)
        sa.frozen = sa.frozen or sb.frozen
        sa.grouped = sa.grouped or sb.grouped
        if sa.width != sb.width:
            sa.frozen = sa.frozen or f"channel widths {sa.width} and {sb.width} meet"
        if sa.segments is None:
            sa.segments = sb.segments
        elif sb.segments is not None and sa.segments != sb.segments:
            sa.frozen = sa.frozen or "two different channel concatenations meet"
        return ra

    def freeze(self, i: int, reason: str) -> None:
        space = self[i]
        space.frozen = space.frozen or reason

    def constrain(self, i: int, blocks: int) -> None:
        space = self[i]
        space.blocks = math.lcm(space.blocks, blocks)


@dataclass
class ChannelInfo:
    """Where a tensor's channels are (``axis``) and which space they belong to.

    ``reads`` is set for layers that map one space to another (convs, linears): the
    space of the channels they read. ``holds`` is False for a layer whose weights do not
    follow its channels (a LayerNorm over another axis): it is never narrowed.
    """

    axis: int | None
    space: int | None
    reads: int | None = None
    holds: bool = True


@dataclass
class Analysis:
    """The result of ``analyse``: channel info per node over one region."""

    traced: "Traced"
    spaces: ChannelSpaces = field(default_factory=ChannelSpaces)
    info: dict[str, ChannelInfo] = field(default_factory=dict)

    # -- helpers the couple functions use --------------------------------------------
    def of(self, node: fx.Node) -> ChannelInfo:
        """Channel info of an input; tensors from outside the region keep their width."""
        if node.name not in self.info:
            dims = shape(node)
            if node.op == "get_attr" and dims is not None and len(dims) == 1:
                self.info[node.name] = ChannelInfo(0, self.spaces.new(dims[0]))  # a per-channel parameter
            elif node.op == "get_attr":
                return ChannelInfo(None, None)  # its channel axis is known once it broadcasts
            elif dims is None or len(dims) < 2:
                self.info[node.name] = ChannelInfo(None, None)
            else:
                reason = f"it also flows to '{node.name}', outside the stage"
                self.info[node.name] = ChannelInfo(1, self.spaces.new(dims[1], frozen=reason))
        return self.info[node.name]

    def module(self, node: fx.Node) -> nn.Module:
        return self.traced.gm.get_submodule(node.target)

    def set(self, node: fx.Node, axis: int | None, space: int | None, reads: int | None = None) -> None:
        self.info[node.name] = ChannelInfo(axis, space, reads)

    def fresh(self, node: fx.Node, axis: int = 1, frozen: str = "") -> int | None:
        """A new space for the channels ``node`` writes (None for non-tensor outputs)."""
        dims = shape(node)
        if dims is None or len(dims) <= axis:
            self.set(node, None, None)
            return None
        space = self.spaces.new(dims[axis], frozen=frozen)
        self.set(node, axis, space)
        return space

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in tensor_inputs(node):
            info = self.of(arg)
            if info.space is not None:
                self.spaces.freeze(info.space, reason)


# ---------------------------------------------------------------------------------------
# Couple functions: one per way an op relates output channels to input channels


def couple_same(node: fx.Node, a: Analysis) -> None:
    """Elementwise, unary, norm, activation, pooling, add, mul: output channels = inputs'.

    Inputs broadcast from the right; one of size 1 on the channel axis does not couple.
    A layer with a channel axis of its own (a norm, ``nn.PReLU(C)``) must find the
    channels there, else their space keeps its width.
    """
    out = shape(node)
    inputs = tensor_inputs(node)
    if out is None:
        return
    lead = next((arg for arg in inputs if a.of(arg).axis is not None and len(shape(arg)) == len(out)), None)
    if lead is None:
        space = a.fresh(node, frozen=f"'{node.name}' reads tensors whose channels cspify cannot follow")
        if space is not None:
            a.freeze_inputs(node, f"'{node.name}' mixes channels cspify cannot follow")
        return
    axis = a.of(lead).axis
    space = a.of(lead).space
    dim = channel_dim(node, a.traced.gm)
    if dim is not None and dim != axis:
        a.spaces.freeze(space, f"'{node.name}' treats axis {dim} as channels while they are on axis {axis}")
    back = axis - len(out)  # the channel axis counted from the right, for broadcasting
    for arg in inputs:
        dims = shape(arg)
        if len(dims) < -back or dims[back] == 1 and out[axis] != 1:
            continue
        if arg.op == "get_attr" and arg.name not in a.info:  # layer scale and the like
            a.set(arg, len(dims) + back, a.spaces.new(dims[back]))
        info = a.of(arg)
        if info.axis is None or info.axis - len(dims) != back:
            reason = f"'{node.name}' combines '{arg.name}', whose channels cspify cannot follow"
            a.spaces.freeze(space, reason)
            if info.space is not None:
                a.spaces.freeze(info.space, reason)
            continue
        space = a.spaces.union(space, info.space)
    a.set(node, axis, space)


def couple_conv(node: fx.Node, a: Analysis) -> None:
    """A convolution: reads its input's channels, writes new ones; depthwise keeps them."""
    conv = a.module(node)
    x = a.of(node.args[0])
    dims_in, dims_out = shape(node.args[0]), shape(node)
    if x.axis is not None and x.axis >= 2 and dims_in[x.axis] == dims_out[x.axis]:
        a.info[node.name] = ChannelInfo(x.axis, x.space, holds=False)  # slides along the channels (ECA)
        return
    if x.axis != 1:
        a.fresh(node, frozen=f"'{node.name}' reads channels on an axis other than 1")
        a.freeze_inputs(node, f"'{node.name}' reads channels on an axis other than 1")
        return
    groups = conv.groups
    if groups > 1 and groups == conv.in_channels == conv.out_channels:
        a.set(node, 1, x.space, reads=x.space)  # depthwise: one space in and out
        return
    if groups > 1 and groups == conv.in_channels:
        reason = f"'{node.name}' is a depthwise conv with a channel multiplier"
        a.spaces.freeze(x.space, reason)
        a.fresh(node, frozen=reason)
        return
    out = a.fresh(node)
    a.info[node.name].reads = x.space
    if groups > 1:
        for space in (x.space, out):
            a.spaces.constrain(space, groups)
            a.spaces[space].grouped = a.spaces[space].grouped or node.name


def couple_linear(node: fx.Node, a: Analysis) -> None:
    """A linear layer: maps the last axis, which must be the channel axis to narrow."""
    x = a.of(node.args[0])
    dims = shape(node.args[0])
    if x.axis is None or x.axis != len(dims) - 1:
        if x.space is not None:
            a.spaces.freeze(x.space, f"'{node.name}' is a linear layer over a non-channel axis")
        a.fresh(node, axis=len(shape(node)) - 1, frozen=f"'{node.name}' output")
        return
    a.fresh(node, axis=len(shape(node)) - 1)
    a.info[node.name].reads = x.space


def couple_group_norm(node: fx.Node, a: Analysis) -> None:
    couple_same(node, a)
    info = a.info.get(node.name)
    if info is not None and info.space is not None:
        a.spaces.constrain(info.space, a.module(node).num_groups)


def couple_layer_norm(node: fx.Node, a: Analysis) -> None:
    """LayerNorm normalises its last axis; subclasses named ...2d (timm's, torchvision's
    LayerNorm2d) permute inside and normalise axis 1. Only that axis can be narrowed."""
    x = a.of(node.args[0])
    dim = channel_dim(node, a.traced.gm)
    if dim is not None and x.axis == dim:
        return couple_same(node, a)
    a.info[node.name] = ChannelInfo(x.axis, x.space, holds=False)


def couple_cat(node: fx.Node, a: Analysis) -> None:
    """torch.cat: along the channel axis it builds a concat of spaces, else it couples."""
    parts, dim = cat_args(node)
    out = shape(node)
    dim = dim % len(out)
    infos = [a.of(p) for p in parts]
    if any(info.axis is None for info in infos) or len({info.axis for info in infos}) != 1:
        space = a.fresh(node, frozen=f"'{node.name}' concatenates tensors cspify cannot follow")
        a.freeze_inputs(node, f"'{node.name}' concatenates tensors cspify cannot follow")
        return
    axis = infos[0].axis
    if dim != axis:
        couple_same(node, a)
        return
    space = a.spaces.new(out[axis], segments=tuple(info.space for info in infos))
    a.set(node, axis, space)


def _dims_arg(node: fx.Node, start: int = 1) -> list:
    """The dims argument of permute/reshape/view, given as varargs or as one sequence."""
    args = list(node.args[start:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if not args:
        for key in ("dims", "shape", "size"):
            if key in node.kwargs:
                return list(node.kwargs[key])
    return args


def _moved(node: fx.Node, a: Analysis, axis: int | None, reason: str) -> None:
    """Output shares the input's space with its channels on ``axis`` (None: lost)."""
    x = a.of(node.args[0])
    if axis is None:
        if x.space is not None:
            a.spaces.freeze(x.space, f"'{node.name}' {reason}")
        a.fresh(node, frozen=f"'{node.name}' {reason}")
        return
    a.set(node, axis, x.space)


def couple_permute(node: fx.Node, a: Analysis) -> None:
    """permute / transpose: the channel axis moves to where the permutation puts it."""
    x = a.of(node.args[0])
    rank = len(shape(node))
    if x.axis is None:
        return couple_unknown(node, a)
    if node.target in ("transpose", torch.transpose):
        d0, d1 = (d % rank for d in _dims_arg(node))
        axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
    else:
        axis = [d % rank for d in _dims_arg(node)].index(x.axis)
    _moved(node, a, axis, "")


def couple_reshape(node: fx.Node, a: Analysis) -> None:
    """reshape / view / flatten: fine while the channel dim survives whole and its size is
    not written as a constant (after narrowing, a constant would be wrong)."""
    x = a.of(node.args[0])
    before, after = shape(node.args[0]), shape(node)
    if x.axis is None or after is None:
        return couple_unknown(node, a)
    lead = math.prod(before[: x.axis])
    axis = next((j for j in range(len(after)) if math.prod(after[:j]) == lead and after[j] == before[x.axis]), None)
    reason = "merges or splits the channel dim" if axis is None else ""
    if axis is not None and node.target not in ("flatten", torch.flatten) and node.op != "call_module":
        sizes = _dims_arg(node)
        if len(sizes) == len(after) and isinstance(sizes[axis], int) and sizes[axis] != -1 and before[x.axis] > 1:
            axis, reason = None, f"reshapes the channels to the constant size {sizes[axis]}"
    _moved(node, a, axis, reason)


def couple_reduce(node: fx.Node, a: Analysis) -> None:
    """mean / sum / amax over some dims: fine while the channel dim is not reduced."""
    x = a.of(node.args[0])
    rank_in, rank_out = len(shape(node.args[0])), len(shape(node) or ())
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if x.axis is None or dims is None:
        return _moved(node, a, None, "reduces over every dim")
    dims = [d % rank_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if x.axis in dims:
        return _moved(node, a, None, "reduces over the channel dim")
    axis = x.axis if rank_out == rank_in else x.axis - sum(d < x.axis for d in dims)
    _moved(node, a, axis, "")


def couple_nothing(node: fx.Node, a: Analysis) -> None:
    """Ops that only look at a tensor (its size, its dim) and make no tensor."""
    a.set(node, None, None)


def couple_unknown(node: fx.Node, a: Analysis) -> None:
    """An op without a rule: its inputs and output keep their widths."""
    reason = f"op '{_op_name(node, a.traced.gm)}' (node '{node.name}') has no channel rule"
    a.freeze_inputs(node, reason)
    a.fresh(node, frozen=reason)


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


COUPLINGS: dict[str, Callable[[fx.Node, Analysis], None]] = {
    "same": couple_same,
    "conv": couple_conv,
    "linear": couple_linear,
    "group_norm": couple_group_norm,
    "layer_norm": couple_layer_norm,
    "cat": couple_cat,
    "permute": couple_permute,
    "reshape": couple_reshape,
    "reduce": couple_reduce,
    "nothing": couple_nothing,
}


# ---------------------------------------------------------------------------------------
# The stream's channel axis: derived from the layers that read it


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
        if node.op not in ("call_module", "call_function", "call_method") or shape(node) is None:
            continue
        if not any(arg.name in axes for arg in tensor_inputs(node)):
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
            stop = f"op '{_op_name(node, gm)}' (node '{name}') has no channel rule"
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
        d0, d1 = (d % rank for d in _dims_arg(node))
        order = list(range(rank))
        order[d0], order[d1] = d1, d0
    else:
        order = [d % rank for d in _dims_arg(node)]
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


# How each coupling moves the axes of what it reads (``stream_axis``); ops of another
# coupling are not followed.
AXIS_MOVES: dict[str, Callable[[fx.Node, dict], tuple[int | None, ...] | None]] = {
    "same": _broadcast_axes,
    "permute": _first_input(_permuted_axes),
    "reshape": _first_input(_reshaped_axes),
    "reduce": _first_input(_reduced_axes),
    "cat": _catted_axes,
}


# ---------------------------------------------------------------------------------------
# The walk


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
        couple(node, a)
    return a
