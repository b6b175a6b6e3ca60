"""Graph helpers every rule and pass shares: shapes, tensor inputs, regions between nodes.

    shape(traced.nodes["layer1_0_conv1"])          # (1, 64, 56, 56), from ShapeProp's tensor_meta
    tensor_inputs(traced.nodes["add"])             # the input nodes that carry tensors
    region_between(traced.graph, "maxpool", "add") # nodes on a path from one node to another
    single_entry(traced, region, "maxpool")        # does the region read only that node (and constants)?
    with_constants(traced, region)                 # the region plus the parameters it reads
    parts, dim = cat_args(traced.nodes["cat"])     # the tensors a torch.cat joins, and along which dim
    cat_parts(traced.nodes["cat"])                 # ([inputs], axis) of a concat along a non-batch axis
    transition_after(traced, "cat", 1)             # the norm/act, 1x1 conv, norm/act nodes after a node
    uncast(node)                                   # the node a rewrite's dtype cast (x.to(y.dtype)) reads
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
import torch.fx as fx

from cspify.ops import channel_dim, role_of, shape

if TYPE_CHECKING:
    from cspify.trace import Traced


def uncast(node: fx.Node) -> fx.Node:
    """The node a dtype cast ``x.to(y.dtype)`` casts (the rewrite ends each converted stage
    with one, a no-op outside autocast), or ``node`` itself where it is no such cast."""
    dtype = node.args[1] if node.op == "call_method" and node.target == "to" and len(node.args) == 2 else None
    is_cast = isinstance(dtype, fx.Node) and dtype.target is getattr and dtype.args[1:] == ("dtype",)
    return node.args[0] if is_cast else node


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The input nodes of ``node`` that carry tensors, in argument order (flattened)."""
    return [n for n in node.all_input_nodes if shape(n) is not None]


def cat_args(node: fx.Node) -> tuple[list | tuple | None, object]:
    """The tensors a ``torch.cat`` node joins and the dim it joins them along, as written
    (positionally or by keyword; the dim may be negative)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return parts, dim


def region_between(graph: nx.DiGraph, entry: str, exit_: str) -> set[str]:
    """Nodes on some path from ``entry`` to ``exit_``: entry excluded, exit included."""
    return (nx.descendants(graph, entry) & nx.ancestors(graph, exit_)) | {exit_}


def single_entry(traced: Traced, region: set[str], entry: str) -> bool:
    """True when the region reads only ``entry``, its own nodes and constants."""
    nodes, constant = traced.nodes, traced.constant
    for name in region:
        for arg in nodes[name].all_input_nodes:
            if arg.name != entry and arg.name not in region and arg.name not in constant:
                if shape(arg) is not None:
                    return False
    return True


def with_constants(traced: Traced, region: set[str]) -> set[str]:
    """The region plus the constant nodes (parameters and what is computed from them) that
    it reads, so that a channel analysis of the region sees them."""
    nodes, constant = traced.nodes, traced.constant
    found, todo = set(region), list(region)
    while todo:
        for arg in nodes[todo.pop()].all_input_nodes:
            if arg.name in constant and arg.name not in found:
                found.add(arg.name)
                todo.append(arg.name)
    return found


def cat_parts(node) -> tuple[list, int] | None:
    """The inputs of a torch.cat node along a non-batch axis, and that axis; None for any
    other node."""
    if node.op != "call_function" or shape(node) is None or len(shape(node)) < 3:
        return None
    parts, dim = cat_args(node)
    if not isinstance(parts, (list, tuple)) or not isinstance(dim, int) or dim % len(shape(node)) == 0:
        return None
    return list(parts), dim % len(shape(node))


def transition_after(traced: Traced, output, axis: int) -> tuple[str, ...]:
    """Norm/act nodes, a 1x1 group-1 conv, then norm/act nodes: each the single user, each
    reading the channels on ``axis`` where it has a channel axis."""
    gm = traced.gm
    tail, node, seen_conv = [], output, False
    while len(node.users) == 1:
        user = next(iter(node.users))
        role = role_of(user, gm)
        if channel_dim(user, gm) not in (None, axis):
            break
        if role in ("norm", "act") and user.args and user.args[0] is node:
            tail.append(user.name)
        elif role == "conv" and not seen_conv and user.args[0] is node:
            conv = gm.get_submodule(user.target)
            if conv.groups != 1 or any(k != 1 for k in conv.kernel_size):
                break
            tail.append(user.name)
            seen_conv = True
        else:
            break
        node = user
    return tuple(tail) if seen_conv else ()
