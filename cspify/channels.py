"""Channel spaces: which tensors of a stage must keep equal channel widths.

``analyse`` walks a region of the traced graph in order and groups the tensors whose
channel dimensions must stay equal into *channel spaces* (a union-find), starting from a
seed tensor: a residual stream and everything added to it, a norm and its input, the
segments of a concat. Narrowing a space narrows every layer that reads or writes it.

How each op relates its output channels to its inputs' is one couple function per way
(``COUPLINGS``); which op couples how is the op table's ``couple`` fact (``cspify.ops``).
An op the table has no channel rule for keeps the widths it touches (``couple_unknown``).

A concat's space is the concat of its parts' spaces (``Space.segments``); a chunk or split
along the channels is its inverse (its pieces are the segments of its input's space); a
channel slice ``x[:, a:b]`` reads part of its input's space (``Analysis.slices``). Which
channels each space keeps follows from those relations (``derive_keeps``), as do the
literal sizes (slice bounds, split sizes) that narrowing changes. A channel count read from
a tensor's shape (``B, C, H, W = x.shape``) is followed too: it may only size that same
space again (``x.view(B, C, -1)``); used anywhere else, its space keeps its width.

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
from itertools import pairwise
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

    def __len__(self) -> int:
        return len(self._spaces)

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
            if sa.width == sb.width:  # one channel dim written as two concats: align their parts
                bounds = set(self._bounds(sa.segments)) | set(self._bounds(sb.segments))
                for x, y in zip(self._refine_all(sa.segments, bounds), self._refine_all(sb.segments, bounds)):
                    self.union(x[0], y[0])
            else:
                sa.frozen = sa.frozen or "two different channel concatenations meet"
        return ra

    def cut(self, i: int, widths: list[int]) -> list[int]:
        """The spaces of consecutive parts of space ``i``, ``widths`` wide (a chunk or a split
        of its channels): ``i`` becomes the concat of them, or of finer parts where it is a
        concat already (a part may then be a concat of its segments' parts)."""
        root = self.find(i)
        if len(widths) <= 1:
            return [root]
        bounds, offset = [], 0
        for width in widths:
            bounds.append((offset, offset + width))
            offset += width
        fine = self._refine(root, {start for start, _ in bounds[1:]})
        parts = []
        for start, stop in bounds:
            members = tuple(space for space, off, _ in fine if start <= off < stop)
            parts.append(members[0] if len(members) == 1 else self.new(stop - start, segments=members))
        return parts

    def _bounds(self, segments: tuple[int, ...]) -> list[int]:
        """The offsets inside a concat where one segment ends and the next begins."""
        offsets, offset = [], 0
        for segment in segments[:-1]:
            offset += self[segment].width
            offsets.append(offset)
        return offsets

    def _refine_all(self, segments: tuple[int, ...], bounds: set[int]) -> list[tuple[int, int, int]]:
        """(space, offset, width) of the parts of a concat of ``segments``, cut at ``bounds``."""
        parts, offset = [], 0
        for segment in segments:
            width = self[segment].width
            inside = {b - offset for b in bounds if offset < b < offset + width}
            parts.extend((space, offset + off, w) for space, off, w in self._refine(self.find(segment), inside))
            offset += width
        return parts

    def _refine(self, root: int, bounds: set[int]) -> list[tuple[int, int, int]]:
        """(space, offset, width) of the parts of ``root`` cut at ``bounds`` (offsets inside
        it): a space that is no concat yet becomes the concat of new parts."""
        space = self._spaces[root]
        inner = sorted(b for b in bounds if 0 < b < space.width)
        if not inner:
            return [(root, 0, space.width)]
        if space.segments is None or any(self.find(s) == root for s in space.segments):
            edges = [0, *inner, space.width]
            parts = [self.new(hi - lo, frozen=space.frozen) for lo, hi in pairwise(edges)]
            space.segments = tuple(parts)
            return [(part, lo, hi - lo) for part, (lo, hi) in zip(parts, pairwise(edges))]
        return self._refine_all(space.segments, set(inner))

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
    follow its channels (a LayerNorm over another axis): it is never narrowed. ``pieces``
    is set for an op that returns several tensors (a chunk, a split): the space of each,
    their channels on ``axis``.
    """

    axis: int | None
    space: int | None
    reads: int | None = None
    holds: bool = True
    pieces: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Slice:
    """A channel slice ``out = source[:, start:stop]`` (``operator.getitem``): channel j of
    space ``out`` is channel ``start + j`` of space ``source``. The index is argument 1 of
    ``node``; ``entry`` is the place of the channel slice in it (None: the index is that slice)."""

    node: str
    source: int
    out: int
    start: int
    stop: int
    entry: int | None


@dataclass(frozen=True)
class Split:
    """A chunk or split along the channels: space ``source`` is the concat of ``pieces``.
    ``chunks``: the n of ``chunk(n)`` (its parts must keep equal widths); None for a split,
    whose sizes are written in argument ``key`` (a position or a keyword) and follow."""

    node: str
    source: int
    pieces: tuple[int, ...]
    chunks: int | None
    key: int | str | None = None


@dataclass(frozen=True)
class Sized:
    """A reshape that writes the channel count of ``space`` as a literal (``scale.view(64,
    1, 1)``): entry ``index`` (None: the argument itself) of argument ``key`` follows
    narrowing."""

    node: str
    space: int
    key: int | str
    index: int | None


@dataclass(frozen=True)
class Size:
    """A channel count read from a tensor's shape: the width of ``space``, read from
    ``source``'s shape by ``node``."""

    space: int
    source: str
    node: str


@dataclass
class Analysis:
    """The result of ``analyse``: channel info per node over one region."""

    traced: "Traced"
    spaces: ChannelSpaces = field(default_factory=ChannelSpaces)
    info: dict[str, ChannelInfo] = field(default_factory=dict)
    slices: list[Slice] = field(default_factory=list)
    splits: list[Split] = field(default_factory=list)
    sized: list[Sized] = field(default_factory=list)
    sizes: dict[str, Size] = field(default_factory=dict)  # nodes whose value is a channel count
    shapes: dict[str, tuple[Size | None, ...]] = field(default_factory=dict)  # x.shape, x.size(): per axis

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

    def counts(self, value) -> list[Size]:
        """The channel counts (``Size``) that ``value`` (an argument) carries: a count read
        from a shape, or a shape (``x.shape``, ``x.size()``), also inside lists and tuples."""
        if isinstance(value, (list, tuple)):
            return [size for v in value for size in self.counts(v)]
        if not isinstance(value, fx.Node):
            return []
        if value.name in self.sizes:
            return [self.sizes[value.name]]
        return [size for size in self.shapes.get(value.name, ()) if size is not None]

    def freeze_counts(self, node: fx.Node) -> None:
        """``node`` uses channel counts read from shapes in a way cspify does not follow:
        their spaces keep their widths."""
        for size in self.counts([*node.args, *node.kwargs.values()]):
            self.spaces.freeze(size.space, f"'{node.name}' uses the channel count of '{size.source}' ('{size.node}')")


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
        why = "is a linear layer over a non-channel axis" if x.axis is not None else "reads a tensor whose channels cspify cannot follow"
        if x.space is not None:
            a.spaces.freeze(x.space, f"'{node.name}' {why}")
        a.fresh(node, axis=len(shape(node)) - 1, frozen=f"'{node.name}' {why}")
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
    not written as a constant (after narrowing, a constant would be wrong). A size read from
    a shape (``x.view(B, C, H * W)`` with ``B, C, H, W = x.shape``) follows narrowing: it may
    size the channel dim of the same space, and nothing else (its space keeps its width)."""
    x = a.of(node.args[0])
    before, after = shape(node.args[0]), shape(node)
    sizes = _sizes_arg(node, a) if node.target not in ("flatten", torch.flatten) and node.op != "call_module" else []
    if x.axis is None or after is None:
        a.freeze_counts(node)
        return couple_unknown(node, a)
    lead = math.prod(before[: x.axis])
    axis = next((j for j in range(len(after)) if math.prod(after[:j]) == lead and after[j] == before[x.axis]), None)
    reason = "merges or splits the channel dim" if axis is None else ""
    if axis is not None and len(sizes) == len(after):
        size = sizes[axis]
        if isinstance(size, int) and size != -1 and before[x.axis] > 1:
            literal = _literal_size(node, axis, x.space)
            if literal is None:
                axis, reason = None, f"reshapes the channels to the constant size {size}"
            else:
                a.sized.append(literal)
        elif isinstance(size, Size) and a.spaces.find(size.space) != a.spaces.find(x.space):
            axis = None
            reason = f"reshapes the channels to the channel count of '{size.source}' ('{size.node}'), another tensor"
    for j, size in enumerate(sizes):
        if isinstance(size, Size) and (j != axis or len(sizes) != len(after)):
            a.spaces.freeze(size.space, f"'{node.name}' reshapes to the channel count of '{size.source}' ('{size.node}')")
    _moved(node, a, axis, reason)


def _literal_size(node: fx.Node, axis: int, space: int) -> Sized | None:
    """Where a view or reshape writes its channel count, at ``axis`` of its sizes, as a
    literal int: a ``Sized`` that says which argument; None where it is not written so."""
    if node.op != "call_method" and node.target is not torch.reshape:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return Sized(node.name, space, 1, axis) if isinstance(node.args[1][axis], int) else None
    if len(node.args) > 2:
        return Sized(node.name, space, 1 + axis, None) if isinstance(node.args[1 + axis], int) else None
    key = next((k for k in ("shape", "size") if isinstance(node.kwargs.get(k), (list, tuple))), None)
    return Sized(node.name, space, key, axis) if key else None


def _sizes_arg(node: fx.Node, a: Analysis) -> list:
    """The sizes of a reshape or view, each an int, a ``Size`` (a channel count read from a
    shape) or None (another value computed in the graph); a shape passed whole
    (``x.view(y.shape)``) counts as its sizes."""
    sizes = _dims_arg(node)
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and sizes[0].name in a.shapes:
        return list(a.shapes[sizes[0].name])
    return [
        size if isinstance(size, int) else a.sizes.get(size.name) if isinstance(size, fx.Node) else None
        for size in sizes
    ]


def couple_reduce(node: fx.Node, a: Analysis) -> None:
    """mean / sum / amax over some dims: the channel dim moves where the others leave it.
    Over the channel dim (an RMS or layer norm written out: ``x.pow(2).mean(1, keepdim=True)``)
    the output has no channels (size 1 broadcasts back): narrowed, it reduces over the
    channels the narrowed stream has, as a narrowed LayerNorm does."""
    x = a.of(node.args[0])
    rank_in, rank_out = len(shape(node.args[0])), len(shape(node) or ())
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if x.axis is None or dims is None:
        return _moved(node, a, None, "reduces over every dim")
    dims = [d % rank_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if x.axis in dims:
        return a.set(node, None, None)
    axis = x.axis if rank_out == rank_in else x.axis - sum(d < x.axis for d in dims)
    _moved(node, a, axis, "")


def couple_nothing(node: fx.Node, a: Analysis) -> None:
    """Ops that only look at a tensor (its size, its dim) and make no tensor. A shape or a
    size read from a tensor's channel axis is remembered (``Analysis.shapes``, ``sizes``)."""
    a.set(node, None, None)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    dims = shape(source) if source is not None else None
    if dims is None:
        return
    info = a.of(source)
    if info.axis is None or info.space is None:
        return
    per_axis = tuple(Size(info.space, source.name, node.name) if i == info.axis else None for i in range(len(dims)))
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.target is getattr and dim == "shape" or node.target == "size" and dim is None:
        a.shapes[node.name] = per_axis
    elif node.target == "size" and isinstance(dim, int) and per_axis[dim] is not None:
        a.sizes[node.name] = per_axis[dim]


def index_axes(index, rank: int) -> list[tuple[int | None, object, int | None]] | None:
    """What a tensor index (``x[:, 2:4, None, ..., 0]``) does to each axis of a ``rank``-dim
    input: (place of its entry in the index or None, the entry: a slice or an int, the axis
    it becomes in the output or None). None for an index cspify does not follow (tensors,
    lists, bounds computed in the graph)."""
    entries = index if isinstance(index, tuple) else (index,)

    def plain(entry) -> bool:
        if entry is None or entry is Ellipsis:
            return True
        if isinstance(entry, slice):
            return all(b is None or isinstance(b, int) and not isinstance(b, bool) for b in (entry.start, entry.stop, entry.step))
        return isinstance(entry, int) and not isinstance(entry, bool)

    if not all(plain(e) for e in entries) or sum(e is Ellipsis for e in entries) > 1:
        return None
    used = sum(e is not None and e is not Ellipsis for e in entries)
    if used > rank:
        return None
    axes, out = [], 0
    for place, entry in enumerate(entries):
        if entry is Ellipsis:
            for _ in range(rank - used):
                axes.append((None, slice(None), out))
                out += 1
        elif entry is None:
            out += 1
        elif isinstance(entry, slice):
            axes.append((place, entry, out))
            out += 1
        else:
            axes.append((place, entry, None))
    while len(axes) < rank:
        axes.append((None, slice(None), out))
        out += 1
    return axes


def couple_getitem(node: fx.Node, a: Analysis) -> None:
    """``operator.getitem``: one tensor of an op that returns several (a chunk's piece), a
    size of a shape, or a tensor index. An index keeps the channels where it slices other
    axes (a spatial crop); a slice of the channels (``x[:, a:b]``, step 1) reads part of its
    input's space (``Analysis.slices``; the full range too, whose bound may be literal);
    anything else on the channel axis (one channel, a step) keeps its input's width."""
    source, index = (node.args + (None, None))[:2]
    if not isinstance(source, fx.Node):
        return couple_unknown(node, a)
    if source.name in a.shapes:  # x.shape[1], x.shape[2:]
        dims = a.shapes[source.name]
        a.set(node, None, None)
        if isinstance(index, int) and -len(dims) <= index < len(dims) and dims[index] is not None:
            a.sizes[node.name] = Size(dims[index].space, dims[index].source, node.name)
        elif isinstance(index, slice):
            a.shapes[node.name] = dims[index]
        return
    if source.name not in a.info and shape(source) is None and shape(node) is not None:
        a.fresh(node, frozen=f"'{node.name}' takes a tensor of '{source.name}', outside the stage")
        return
    info = a.of(source)
    if info.pieces is not None:  # a chunk's or split's pieces
        if isinstance(index, int) and -len(info.pieces) <= index < len(info.pieces):
            return a.set(node, info.axis, info.pieces[index])
        if isinstance(index, slice):
            a.info[node.name] = ChannelInfo(info.axis, None, pieces=info.pieces[index])
            return
        return couple_unknown(node, a)
    before, after = shape(source), shape(node)
    if before is None or after is None or info.axis is None:
        return couple_unknown(node, a)
    axes = index_axes(index, len(before))
    if axes is None:
        return _moved(node, a, None, "indexes its input with tensors, lists or bounds computed in the graph")
    place, entry, axis = axes[info.axis]
    if axis is None:
        return _moved(node, a, None, f"takes channel {entry} alone")
    if place is None:  # the index writes no bound for the channels (x[..., 1:-1]): all of them, always
        return a.set(node, axis, info.space)
    start, stop, step = entry.indices(before[info.axis])
    if step != 1:
        return _moved(node, a, None, f"takes every {step}th channel" if step > 1 else "reverses the channels")
    if stop <= start:
        return _moved(node, a, None, "takes no channel")
    out = a.spaces.new(stop - start)
    a.slices.append(Slice(node.name, info.space, out, start, stop, place if isinstance(index, tuple) else None))
    a.set(node, axis, out)


def _tuple_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
    """The shapes of the tensors an op returns as a tuple or list (a chunk, a split)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and meta and all(hasattr(m, "shape") for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


def couple_split(node: fx.Node, a: Analysis) -> None:
    """``chunk`` / ``split``: along the channels, the inverse of a concat: the input's space
    is the concat of the pieces' (``Analysis.splits``); along another axis each piece keeps
    the input's channels."""
    source = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
    pieces = _tuple_shapes(node)
    info = a.of(source) if isinstance(source, fx.Node) else ChannelInfo(None, None)
    dims = shape(source) if isinstance(source, fx.Node) else None
    if info.axis is None or dims is None or pieces is None:
        return couple_unknown(node, a)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return couple_unknown(node, a)
    if dim % len(dims) != info.axis:
        a.info[node.name] = ChannelInfo(info.axis, None, pieces=(info.space,) * len(pieces))
        return
    if node.target in ("chunk", torch.chunk):
        count, key = (node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")), None
    else:
        key = 1 if len(node.args) > 1 else next((k for k in ("split_size_or_sections", "split_size") if k in node.kwargs), None)
        count = node.args[key] if isinstance(key, int) else node.kwargs.get(key)
    sizes = count if isinstance(count, (list, tuple)) else [count]
    if not all(isinstance(size, int) and not isinstance(size, bool) for size in sizes):
        reason = f"'{node.name}' splits the channels by sizes computed in the graph"
        a.spaces.freeze(info.space, reason)
        a.info[node.name] = ChannelInfo(info.axis, None, pieces=tuple(a.spaces.new(p[info.axis], frozen=reason) for p in pieces))
        return
    spaces = tuple(a.spaces.cut(info.space, [p[info.axis] for p in pieces]))
    a.splits.append(Split(node.name, info.space, spaces, None if key is not None else count, key))
    a.info[node.name] = ChannelInfo(info.axis, None, pieces=spaces)


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
    "getitem": couple_getitem,
    "split": couple_split,
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
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if shape(node) is None and _tuple_shapes(node) is None:
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


def _indexed_axes(node: fx.Node, axes: dict) -> tuple[int | None, ...] | None:
    """getitem: a piece of a chunk or split has its input's axes; a tensor index keeps the
    axes it slices (and drops those it takes one entry of)."""
    source, index = (node.args + (None, None))[:2]
    before = axes[source.name]
    dims = shape(source)
    if dims is None:
        return before if isinstance(index, int) and _tuple_shapes(source) is not None else None
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
    if not isinstance(source, fx.Node) or source.name not in axes or _tuple_shapes(node) is None:
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


# ---------------------------------------------------------------------------------------
# Which channels each space keeps


class NarrowingError(Exception):
    """Why the channels of a stage cannot be narrowed as asked: one sentence."""


class EmptyPart(NarrowingError):
    """A chunk or split would leave one of its parts no channels (``split``: which one)."""

    def __init__(self, message: str, split: Split) -> None:
        super().__init__(message)
        self.split = split


@dataclass
class Keeps:
    """Which channels each space keeps (``derive_keeps``), and the literal sizes in the
    graph that narrowing changes: ``args[(node, key)]`` is the new value of argument ``key``
    (a position, or a keyword) of ``node`` (a slice's index, a split's sizes), and
    ``moved`` says in a sentence each what changes."""

    spaces: ChannelSpaces
    decided: dict[int, tuple[int, ...]]
    names: dict[int, str]
    args: dict[tuple[str, int | str], object] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)

    def of(self, space: int) -> tuple[int, ...] | None:
        """The channels ``space`` keeps, None for all of them."""
        root = self.spaces.find(space)
        keep = self.decided.get(root)
        if keep is None or len(keep) == self.spaces[root].width:
            return None
        if not keep:
            raise NarrowingError(f"narrowing would leave '{self.names.get(root, '?')}' no channels")
        return keep


def _chunk_widths(width: int, chunks: int) -> list[int]:
    """The widths of ``torch.chunk``'s parts of ``width`` channels in ``chunks``."""
    size = -(-width // chunks) if width else 0
    return [min(size, width - start) for start in range(0, width, size)] if size else []


def derive_keeps(a: Analysis, keeps: dict[int, tuple[int, ...]]) -> Keeps:
    """Which channels every space of ``a`` keeps, given those of some (``keeps``: the
    stream's through part, a transition's, scaled inner widths); raises NarrowingError with
    the reason where that is not possible.

    The relations: a concat keeps its segments' kept channels, in order, and a segment the
    part of its concat's that falls in it (a chunk or split piece of a narrowed tensor); a
    channel slice keeps the kept channels of its source in its range, or the source keeps
    at least the slice's (then only the slice's bounds change). A space nothing narrows keeps
    every channel. A chunk's parts must keep the widths ``chunk(n)`` gives; a slice's kept
    channels must be next to each other in its narrowed source. Where a slice's bounds or a
    split's sizes change, ``args`` holds the new ones.
    """
    spaces, find = a.spaces, a.spaces.find
    names: dict[int, str] = {}  # a node that holds each space, for the reasons
    for field_ in ("space", "reads", "pieces"):
        for name, info in a.info.items():
            value = getattr(info, field_)
            for space in value if isinstance(value, tuple) else (value,):
                if space is not None:
                    names.setdefault(find(space), name)
    roots = sorted({find(i) for i in range(len(spaces))})
    concats = {}
    for root in roots:
        segments = spaces[root].segments
        if segments and not any(find(s) == root for s in segments):
            parts, offset = [], 0
            for segment in segments:
                parts.append((find(segment), offset, spaces[segment].width))
                offset += spaces[segment].width
            concats[root] = parts
    for root, parts in concats.items():
        for part, _, _ in parts:
            names.setdefault(part, names.get(root, "?"))
    slices = [(s, find(s.source), find(s.out)) for s in a.slices]
    outs = {out for _, _, out in slices}
    decided: dict[int, tuple[int, ...]] = {}
    origin: dict[int, int] = {}  # root -> the root whose keep decided it

    def decide(root: int, keep: tuple[int, ...], by: int) -> bool:
        if root not in decided:
            decided[root], origin[root] = keep, by
            return True
        if decided[root] != keep:
            first, second = (
                "its own narrowing" if o == root else f"'{names.get(o, '?')}'" for o in (origin[root], by)
            )
            how = f"through {first} and through {second}" if first != second else f"twice through {first}"
            raise NarrowingError(f"'{names.get(root, '?')}' would keep different channels {how}")
        return False

    for root, keep in keeps.items():
        decide(find(root), tuple(keep), find(root))
    while True:
        changed = True
        while changed:
            changed = False
            for root, parts in concats.items():
                if root in decided:
                    keep = decided[root]
                    for part, offset, width in parts:
                        changed |= decide(part, tuple(i - offset for i in keep if offset <= i < offset + width), root)
                elif all(part in decided for part, _, _ in parts):
                    changed |= decide(root, tuple(offset + i for part, offset, _ in parts for i in decided[part]), parts[0][0])
            for s, source, out in slices:
                if source in decided and out not in decided:
                    changed |= decide(out, tuple(i - s.start for i in decided[source] if s.start <= i < s.stop), source)
        pending = [r for r in roots if r not in decided and r not in concats]
        leaves = [r for r in pending if r not in outs] or pending
        if not leaves:
            break
        for root in leaves:  # nothing narrows it: it keeps every channel
            decided[root], origin[root] = tuple(range(spaces[root].width)), root
    for root in roots:
        decided.setdefault(root, tuple(range(spaces[root].width)))
    result = Keeps(spaces, decided, names)
    for split in a.splits:
        _check_split(split, result)
    for s, source, out in slices:
        _check_slice(s, source, out, result, a)
    for sized in a.sized:
        _check_sized(sized, result, a)
    return result


def _check_sized(sized: Sized, keeps: Keeps, a: Analysis) -> None:
    """A literal channel count in a reshape becomes the narrowed width."""
    keep = keeps.of(sized.space)
    if keep is None:
        return
    node = a.traced.nodes[sized.node]
    value = node.args[sized.key] if isinstance(sized.key, int) else node.kwargs[sized.key]
    old = value if sized.index is None else value[sized.index]
    new = len(keep) if sized.index is None else type(value)((*value[: sized.index], len(keep), *value[sized.index + 1 :]))
    keeps.args[(sized.node, sized.key)] = new
    keeps.moved.append(f"'{sized.node}' reshapes the channels to the literal size {old}, which narrowing changes to {len(keep)}")


def _check_split(split: Split, keeps: Keeps) -> None:
    """A chunk's parts keep the widths chunk(n) gives; a split's sizes follow its parts'."""
    spaces = keeps.spaces
    for space in (split.source, *split.pieces):
        if spaces[space].frozen and keeps.of(space) is not None:
            raise NarrowingError(f"{spaces[space].frozen}, so its channels cannot be narrowed")
    counts = [len(keeps.decided[spaces.find(p)]) for p in split.pieces]
    widths = [spaces[p].width for p in split.pieces]
    if counts == widths:
        return
    if 0 in counts:
        raise EmptyPart(f"narrowing would leave a part of '{split.node}' no channels", split)
    if split.chunks is not None:
        if counts != _chunk_widths(sum(counts), split.chunks):
            raise NarrowingError(
                f"'{split.node}' chunks {sum(widths)} channels in {split.chunks}, and narrowing would keep "
                f"{counts} of its parts, which chunk({split.chunks}) does not give"
            )
        return
    keeps.args[(split.node, split.key)] = counts
    keeps.moved.append(f"'{split.node}' splits its channels by the literal sizes {widths}, which narrowing changes to {counts}")


def _check_slice(s: Slice, source: int, out: int, keeps: Keeps, a: Analysis) -> None:
    """The slice's kept channels are kept by its source, next to each other; its bounds
    change where the narrowed source puts them elsewhere."""
    spaces = keeps.spaces
    kept_source, kept = keeps.decided[source], keeps.decided[out]
    name = keeps.names.get(source, "?")
    if not kept:
        raise NarrowingError(f"narrowing would leave '{s.node}' no channels")
    position = {channel: i for i, channel in enumerate(kept_source)}
    if any(s.start + j not in position for j in kept):
        raise NarrowingError(f"'{s.node}' reads channels of '{name}' that narrowing drops")
    places = [position[s.start + j] for j in kept]
    start, stop = places[0], places[0] + len(places)
    if places != list(range(start, stop)):
        raise NarrowingError(f"'{s.node}' would read channels of '{name}' that narrowing leaves apart")
    node = a.traced.nodes[s.node]
    index = node.args[1]
    entry = index if s.entry is None else index[s.entry]
    if entry.indices(len(kept_source))[:2] == (start, stop):
        return  # the literal bounds still take the same channels (a full range)
    for space in (source, out):
        if spaces[space].frozen and keeps.of(space) is not None:
            raise NarrowingError(f"{spaces[space].frozen}, so its channels cannot be narrowed")
    new = slice(start or None, None if stop == len(kept_source) else stop)
    keeps.args[(s.node, 1)] = new if s.entry is None else (*index[: s.entry], new, *index[s.entry + 1 :])
    keeps.moved.append(
        f"'{s.node}' slices channels {s.start}:{s.stop} of '{name}' by literal bounds, "
        f"which narrowing moves to {start}:{stop}"
    )


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
