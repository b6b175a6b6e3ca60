"""Give a traced model back the in-place adds its source wrote.

torch.fx records ``out += identity`` as ``out + identity``, so a GraphModule allocates a
new tensor for every residual add that the eager model did in place: a cost of tracing,
not of the CSP rewrite (about 1% of ResNet-50's CPU latency at batch 16 on a 2-core
machine, ``python benchmarks/inplace_adds.py``, and one activation per residual block).
``restore_inplace_adds`` turns ``a + b`` into ``a.add_(b)`` where that is safe in any mode:

- ``a`` (or ``b``: addition commutes) is the output of a layer without forward hooks
  whose op table entry (``cspify.ops``, exact type) has ``fresh_output``: a plain torch.nn
  conv, linear or norm layer, a new tensor whose backward never reads it;
- the add is its only user, so nothing reads ``a`` afterwards;
- ``a`` has the add's shape and dtype, so nothing broadcasts into it.

Shapes come from the ``tensor_meta`` that shape propagation leaves on the nodes.

    restore_inplace_adds(gm)   # edits gm in place; returns how many adds it changed
"""

from __future__ import annotations

import torch.fx as fx

from cspify.ops import exact_op, role_of


def restore_inplace_adds(gm: fx.GraphModule) -> int:
    """Turn the safe ``a + b`` nodes of ``gm`` into ``a.add_(b)``; return how many."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or role_of(node, gm) != "add" or node.kwargs or len(node.args) != 2:
            continue
        receiver = next((a for a in node.args if _may_receive(gm, a, node)), None)
        if receiver is None:
            continue
        other = node.args[1] if receiver is node.args[0] else node.args[0]
        node.op, node.target, node.args = "call_method", "add_", (receiver, other)  # keeps the node's name
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _may_receive(gm: fx.GraphModule, arg, add: fx.Node) -> bool:
    if not isinstance(arg, fx.Node) or arg.op != "call_module" or len(arg.users) != 1:
        return False
    op = exact_op(arg, gm)  # exact type: a subclass (timm's BatchNormAct2d) may add an activation
    if op is None or not op.fresh_output or gm.get_submodule(arg.target)._forward_hooks:
        return False
    mine, result = arg.meta.get("tensor_meta"), add.meta.get("tensor_meta")
    return (
        mine is not None and result is not None and hasattr(mine, "shape") and hasattr(result, "shape")
        and mine.shape == result.shape and mine.dtype == result.dtype
    )
