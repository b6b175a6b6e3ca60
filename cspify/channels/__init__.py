"""Channel spaces: which tensors of a stage must keep equal channel widths.

``analyse`` walks a region of the traced graph in order and groups the tensors whose
channel dimensions must stay equal into *channel spaces* (a union-find), starting from a
seed tensor: a residual stream and everything added to it, a norm and its input, the
segments of a concat. Narrowing a space narrows every layer that reads or writes it.
Which channels each space keeps then follows from the relations the walk records
(``derive_keeps``), as do the literal sizes (slice bounds, split sizes) that narrowing
changes. Which axis of a stream holds its channels is never assumed: ``stream_axis``
derives it from the layers that read the stream.

    a = analyse(traced, stage.nodes, seed=stage.base, seed_axis=stage.channel_axis)
    a.spaces[a.info[stage.base].space].width        # 256: the stream width
    keeps = derive_keeps(a, {a.info[stage.base].space: tuple(range(128))})
    stream_axis(traced, stage.nodes, stage.base)    # (1, ""); (3, "") for a channels-last stream

One module per mechanism:

    spaces     the union-find of channel spaces (``Space``, ``ChannelSpaces``)
    analysis   what a walk records (``Analysis``, ``ChannelInfo``, ``Slice``, ``Split``, ``Sized``, ``Size``)
    couplings  one couple function per way an op relates its channels (``COUPLINGS``, keyed by ``cspify.ops``)
    walk       ``analyse``: the couplings over a region, in graph order
    stream     ``stream_axis``: the axis of a stream its layers read as channels (``AXIS_MOVES``)
    keeps      ``derive_keeps``: which channels each space keeps, and its checks (``NarrowingError``)
"""

from cspify.channels.analysis import Analysis, ChannelInfo, Size, Sized, Slice, Split
from cspify.channels.couplings import COUPLINGS, index_axes
from cspify.channels.keeps import EmptyPart, Keeps, NarrowingError, derive_keeps
from cspify.channels.spaces import ChannelSpaces, Space
from cspify.channels.stream import AXIS_MOVES, stream_axis
from cspify.channels.walk import analyse

__all__ = [
    "AXIS_MOVES",
    "COUPLINGS",
    "Analysis",
    "ChannelInfo",
    "ChannelSpaces",
    "EmptyPart",
    "Keeps",
    "NarrowingError",
    "Size",
    "Sized",
    "Slice",
    "Space",
    "Split",
    "analyse",
    "derive_keeps",
    "index_axes",
    "stream_axis",
]
