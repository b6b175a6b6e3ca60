"""Pyramid compression, as the CSPNet paper's Exact Fusion Model does it: where a concat
fuses feature maps of different pyramid levels and convs read it, Maxout over pairs of
neighbouring channels halves what those convs read (``pyramid="maxout"``, ``--pyramid maxout``).

    csp = cspify.convert(fpn, x, pyramid="maxout")      # tests/test_pyramid.py's FPN
    conversion_of(csp).fusions
    # (Fusion(cat='cat', conv='fuse_0', module='fuse.0', channels=32, groups=2, start=0, sliced=False),)

A concat fuses levels when its inputs come from different resolutions: one was resized on
its way (an upsample, a strided conv or pool) from a resolution the others were not. Where a
CSP stage starts at the concat (a YOLOv3 five-conv set, ``rules/plain.py``), the Maxout
compresses each part of its split instead: the through part before the stage's first conv,
the bypass before the transition that reads it. A conv reading a Maxout keeps its output:
those input channels halve, their weights start as the sum of each pair's (exact where a
pair's two channels are equal) and ``calibrate`` refits them by least squares: to the
original's output of the same conv, or with their stage's layers. Each input of the concat
must have an even width (and a split part an even start and width), so that every pair lies
within one level. What the pyramid saves is the convs' inputs (their CIO) and multiply-adds;
the concat itself is still written, and each Maxout is one more read of what it compresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from cspify.graph import cat_args, shape
from cspify.ops import role_of

GROUPS = 2  # channels per Maxout: pairs, as the paper's EFM


@dataclass(frozen=True)
class Fusion:
    """A conv that reads a pyramid concat compressed by Maxout: the concat's node, the conv
    (node and module path), the channels of the concat it reads (``start`` on, ``channels``
    of them: all of it, or the part a CSP split gave it) and the channels each Maxout reads."""

    cat: str
    conv: str
    module: str
    channels: int
    groups: int = GROUPS
    start: int = 0
    sliced: bool = False  # a part of the concat (a CSP split's), not all of it

    @property
    def note(self) -> str:
        part = f"channels {self.start}:{self.start + self.channels} of " if self.sliced else ""
        return (f"'{self.module}' reads {part}the pyramid concat '{self.cat}' compressed by Maxout over "
                f"{self.groups} channels ({self.channels} -> {self.channels // self.groups})")


def compress(gm: fx.GraphModule) -> tuple[Fusion, ...]:
    """Compress, in place, what convs read of every pyramid concat of ``gm`` (shapes
    propagated): the concat itself where convs alone read it, else each channel slice of it
    (a CSP split's bypass and through part) that convs alone read; the fusions made. The
    caller propagates shapes again and checks the outputs."""
    fusions, segments = [], {}
    for node in list(gm.graph.nodes):
        if not fuses_levels(node) or any(shape(p)[1] % GROUPS for p in cat_args(node)[0]):
            continue
        whole = _readers(gm, node)
        slices = [(node, 0, shape(node)[1], whole)] if whole else [
            (user, user.args[2], user.args[3], readers) for user in list(node.users)
            if _even_slice(user, node) and (readers := _readers(gm, user))]
        for tensor, start, width, readers in slices:
            _maxout_after(gm, tensor, width)
            for conv, offset in readers:
                segments.setdefault(conv, []).append((offset, width))
                fusions.append(Fusion(node.name, conv.name, conv.target, width, start=start, sliced=tensor is not node))
    for conv, parts in segments.items():
        _set_module(gm, conv.target, _narrowed(gm.get_submodule(conv.target), parts))
    gm.graph.lint()
    gm.recompile()
    return tuple(fusions)


def _readers(gm: fx.GraphModule, tensor: fx.Node) -> list[tuple[fx.Node, int]] | None:
    """The convs that read ``tensor`` and where its channels start in their input: each user
    a conv reading it, or a channel concat that only convs read; else None."""
    found = []
    for user in tensor.users:
        if _conv_of(gm, user, tensor):
            found.append((user, 0))
            continue
        parts, dim = cat_args(user) if user.op == "call_function" and user.target is torch.cat else (None, None)
        if not parts or dim not in (1, -3) or list(parts).count(tensor) != 1 or not user.users \
                or not all(_conv_of(gm, conv, user) for conv in user.users):
            return None
        offset = sum(shape(p)[1] for p in parts[: list(parts).index(tensor)])
        found += [(conv, offset) for conv in user.users]
    return found or None


def _conv_of(gm: fx.GraphModule, node: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``node`` is a plain (ungrouped) 2-d conv whose input is ``tensor``, and the
    only call of its module (narrowing it must not change another call)."""
    if node.op != "call_module" or role_of(node, gm) != "conv" or node.args[:1] != (tensor,) or len(node.args) > 1 \
            or sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) != 1:
        return False
    module = gm.get_submodule(node.target)
    return type(module) is nn.Conv2d and module.groups == 1


def _even_slice(node: fx.Node, of: fx.Node) -> bool:
    """Whether ``node`` is ``torch.narrow(of, 1, start, length)`` with both even: its pairs
    lie within one level."""
    return (node.op == "call_function" and node.target is torch.narrow and node.args[:2] in ((of, 1), (of, -3))
            and len(node.args) == 4 and all(isinstance(a, int) and a % GROUPS == 0 for a in node.args[2:]))


def _maxout_after(gm: fx.GraphModule, tensor: fx.Node, width: int) -> None:
    """Every user of ``tensor`` reads its Maxout over pairs of channels instead."""
    users = list(tensor.users)
    with gm.graph.inserting_after(tensor):
        pairs = gm.graph.call_method("unflatten", (tensor, 1, (width // GROUPS, GROUPS)))
    with gm.graph.inserting_after(pairs):
        maxout = gm.graph.call_method("amax", (pairs, 2))
    for user in users:
        user.replace_input_with(tensor, maxout)


def fuses_levels(node: fx.Node) -> bool:
    """Whether ``node`` is a channel concat of 4-d feature maps (shapes propagated) that come
    from more than one resolution: pyramid levels joined."""
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    parts, dim = cat_args(node)
    dims = shape(node)
    if dims is None or len(dims) != 4 or dim not in (1, -3) or not isinstance(parts, (list, tuple)) \
            or any(not isinstance(p, fx.Node) or shape(p) is None for p in parts):
        return False
    return len({_source(p) for p in parts}) >= 2


def _source(node: fx.Node) -> tuple:
    """The resolution ``node``'s features come from: its input's, where the op that made it
    resized them (an upsample, a strided conv or pool), else its own."""
    inputs = [a for a in node.all_input_nodes if shape(a) is not None and len(shape(a)) == 4]
    mine = shape(node)
    if inputs and tuple(shape(inputs[0])[2:]) != tuple(mine[2:]):
        return tuple(shape(inputs[0])[2:])
    return tuple(mine[2:])


def _narrowed(conv: nn.Conv2d, parts: list[tuple[int, int]]) -> nn.Conv2d:
    """The conv reading Maxouts: each of its input ``parts`` (offset, width) halved, each
    weight there the sum of its pair's; its other input channels as they were."""
    weight, pieces, at = conv.weight.detach(), [], 0
    for offset, width in sorted(parts):
        pairs = weight[:, offset : offset + width].unflatten(1, (width // GROUPS, GROUPS))
        pieces += [weight[:, at:offset], pairs.sum(2)]
        at = offset + width
    weight = torch.cat([*pieces, weight[:, at:]], 1)
    new = nn.Conv2d(weight.shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    return new


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
