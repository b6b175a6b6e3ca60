"""Which channels each space keeps, and the literal sizes in the graph that narrowing changes.

Given the channels some spaces keep (the stream's through part, a transition's, scaled
inner widths), ``derive_keeps`` follows the relations an analysis records: a concat keeps
its segments' kept channels, a chunk's or split's pieces the part of their input's that
falls in them, a channel slice the kept channels of its source in its range; a space
nothing narrows keeps every channel. Where that is not possible it raises
``NarrowingError`` with the reason (``EmptyPart``: a part would be left no channels).

    keeps = derive_keeps(a, {a.info[stage.base].space: tuple(range(128))})  # the through part of a 256-wide stream
    keeps.of(a.info["layer1_0_conv1"].reads)        # (0, 1, ..., 127); None for a space that keeps every channel
    keeps.args                                      # {("split", 1): [64, 64]}: new literal sizes, per (node, argument)
    keeps.moved                                     # one sentence per literal that changes
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cspify.channels.analysis import Analysis, Sized, Slice, Split
from cspify.channels.spaces import ChannelSpaces


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
