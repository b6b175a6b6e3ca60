"""Channel spaces: a union-find of the channel dimensions that must keep equal widths.

A space is one channel dimension that several tensors of a stage share (a residual stream
and everything added to it, a norm and its input). ``union`` joins two spaces, ``cut``
splits one into consecutive parts (a chunk or split of its channels), and a space may be
the concat of others (``Space.segments``). Narrowing a space narrows every layer that
reads or writes it; a frozen one keeps its width, and says why.

    spaces = ChannelSpaces()
    stream, added = spaces.new(256), spaces.new(256)
    spaces.union(stream, added)                     # the bypass's add joins the stream
    spaces[added].width                             # 256: the stream width
    base, through = spaces.cut(stream, [128, 128])  # the stream is now the concat of its two parts
    spaces[stream].segments == (base, through)      # True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise


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
