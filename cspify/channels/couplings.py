"""Couplings: one function per way an op relates its output channels to its inputs'.

``analyse`` couples each node of a region, in graph order, by the function the op table
names for it (``cspify.ops``: its ``couple`` fact, a key of ``COUPLINGS``). An op the
table has no channel rule for keeps the widths it touches (``couple_unknown``).

A concat's space is the concat of its parts' spaces; a chunk or split along the channels
is its inverse (its pieces are the segments of its input's space); a channel slice
``x[:, a:b]`` reads part of its input's space (``Analysis.slices``). A channel count read
from a tensor's shape (``B, C, H, W = x.shape``) is followed too: it may only size that
same space again (``x.view(B, C, -1)``); used anywhere else, its space keeps its width.

    node = traced.nodes["layer1_0_conv1"]
    COUPLINGS[rule_for(node, traced.gm).couple](node, a)   # couple_conv: reads the stream, writes a new space
    index_axes((slice(None), slice(0, 32)), 4)             # [(0, slice(None), 0), (1, slice(0, 32), 1), (None, ...), ...]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx as fx

from cspify.channels.analysis import Analysis, ChannelInfo, Size, Sized, Slice, Split
from cspify.graph import cat_args, shape, tensor_inputs
from cspify.ops import channel_dim


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


def dims_arg(node: fx.Node, start: int = 1) -> list:
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
        d0, d1 = (d % rank for d in dims_arg(node))
        axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
    else:
        axis = [d % rank for d in dims_arg(node)].index(x.axis)
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
    sizes = dims_arg(node)
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


def tuple_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
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
    pieces = tuple_shapes(node)
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
    reason = f"op '{op_name(node, a.traced.gm)}' (node '{node.name}') has no channel rule"
    a.freeze_inputs(node, reason)
    a.fresh(node, frozen=reason)


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
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
