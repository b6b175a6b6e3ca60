"""Channel spaces: which tensors of a stage must keep equal channel widths.

``analyse`` walks a region of the traced graph in order and groups the tensors whose
channel dimensions must stay equal into *channel spaces* (a union-find), starting from a
seed tensor: a residual stream and everything added to it, a norm and its input, the
segments of a concat. Narrowing a space narrows every layer that reads or writes it.

How each op relates its output channels to its inputs' is one couple function per way
(``COUPLINGS``); which op couples how is the op table's ``couple`` fact (``cspify.ops``).
An op the table has no channel rule for keeps the widths it touches (``couple_unknown``).

    a = analyse(traced, stage.nodes, seed=stage.base)
    a.info["layer1_1_conv1"].reads                  # the space conv1 reads: the stage's stream
    a.spaces[a.info[stage.base].space].width        # 256: the stream's width
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
from cspify.ops import rule_for

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
    norm = a.module(node)
    x = a.of(node.args[0])
    rank = len(shape(node.args[0]))
    norm_axis = 1 if type(norm).__name__.endswith("2d") else rank - 1
    if len(norm.normalized_shape) == 1 and x.axis == norm_axis:
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
    reason = f"op '{_op_name(node, a)}' (node '{node.name}') has no channel rule"
    a.freeze_inputs(node, reason)
    a.fresh(node, frozen=reason)


def _op_name(node: fx.Node, a: Analysis) -> str:
    if node.op == "call_module":
        return type(a.module(node)).__name__
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
