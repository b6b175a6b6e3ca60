"""What ``analyse`` records over a region: channel info per node and the relations between spaces.

``ChannelInfo`` says where a tensor's channels are and which space they belong to.
``Slice``, ``Split`` and ``Sized`` record the literal bounds and sizes that narrowing
changes (a channel slice ``x[:, a:b]``, a split's sizes, a reshape's channel count);
``Size`` is a channel count read from a tensor's shape (``B, C, H, W = x.shape``).
``Analysis`` holds them all, with the helpers the couple functions use
(``cspify.channels.couplings``).

    a = analyse(traced, stage.nodes, seed=stage.base, seed_axis=stage.channel_axis)
    a.info["layer1_1_conv1"].reads                  # the space conv1 reads: the stage's stream
    a.spaces[a.info[stage.base].space].width        # 256: the stream width
    a.slices                                        # [Slice(node='getitem', ...)]: x[:, :c] reads part of a space
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx
import torch.nn as nn

from cspify.channels.spaces import ChannelSpaces
from cspify.graph import shape, tensor_inputs

if TYPE_CHECKING:
    from cspify.trace import Traced


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
