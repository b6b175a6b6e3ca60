"""Pyramid compression, as the CSPNet paper's Exact Fusion Model does it: where a concat
fuses feature maps of different pyramid levels and one conv reads it, Maxout over pairs of
neighbouring channels halves what that conv reads (``pyramid="maxout"``, ``--pyramid maxout``).

    csp = cspify.convert(fpn, x, pyramid="maxout")      # tests/test_pyramid.py's FPN
    conversion_of(csp).fusions      # (Fusion(cat='cat', conv='fuse_0', module='fuse.0', channels=32, groups=2),)

A concat fuses levels when its inputs come from different resolutions: one was resized on
its way (an upsample, a strided conv or pool) from a resolution the others were not. The
conv reading it keeps its output: its input width halves, its weights start as the sum of
each pair's (exact where a pair's two channels are equal) and ``calibrate`` refits them by
least squares to the original's output of the same conv. Each input of the concat must
have an even width, so that every pair lies within one level. The memory the pyramid saves
is the conv's input (its CIO) and its multiply-adds; the concat itself is still written.
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
    """A pyramid concat compressed by Maxout: its node, the conv reading it (node and module
    path), its width before and the number of channels each Maxout reads."""

    cat: str
    conv: str
    module: str
    channels: int
    groups: int = GROUPS

    @property
    def note(self) -> str:
        return (f"'{self.module}' reads the pyramid concat '{self.cat}' compressed by Maxout over "
                f"{self.groups} channels ({self.channels} -> {self.channels // self.groups})")


def compress(gm: fx.GraphModule) -> tuple[Fusion, ...]:
    """Compress every pyramid concat of ``gm`` (shapes propagated) that one conv reads, in
    place; the fusions made. The caller propagates shapes again and checks the outputs."""
    fusions = []
    for node in list(gm.graph.nodes):
        conv = _reader(gm, node)
        if conv is None:
            continue
        module = gm.get_submodule(conv.target)
        channels = shape(node)[1]
        with gm.graph.inserting_after(node):
            pairs = gm.graph.call_method("unflatten", (node, 1, (channels // GROUPS, GROUPS)))
        with gm.graph.inserting_after(pairs):
            maxout = gm.graph.call_method("amax", (pairs, 2))
        conv.replace_input_with(node, maxout)
        _set_module(gm, conv.target, _narrowed(module))
        fusions.append(Fusion(node.name, conv.name, conv.target, channels))
    gm.graph.lint()
    gm.recompile()
    return tuple(fusions)


def _reader(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The conv that alone reads ``node``, where ``node`` is a channel concat of pyramid
    levels that Maxout can compress; else None."""
    if not fuses_levels(node) or len(node.users) != 1 or any(shape(p)[1] % GROUPS for p in cat_args(node)[0]):
        return None
    conv = next(iter(node.users))
    if conv.op != "call_module" or role_of(conv, gm) != "conv" or conv.args[:1] != (node,):
        return None
    module = gm.get_submodule(conv.target)
    return conv if type(module) is nn.Conv2d and module.groups == 1 else None


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


def _narrowed(conv: nn.Conv2d) -> nn.Conv2d:
    """The conv reading the Maxout: half the input channels, each weight the sum of its pair's."""
    new = nn.Conv2d(conv.in_channels // GROUPS, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        weight = conv.weight.unflatten(1, (conv.in_channels // GROUPS, GROUPS)).sum(2)
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    return new


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
