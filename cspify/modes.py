"""Models whose forward reads ``self.training``: a traced graph freezes the mode it was
traced in, so a converted model would act the same in train and eval mode.

    traced = trace_in_mode(model, inputs)   # as trace(), but checked against the other mode

The model is traced in both modes. Where the graphs differ only in flags equal to the mode
(``F.dropout(x, p, self.training)``, ``stochastic_depth(..., self.training)``), those flags
are read from the GraphModule's own ``training`` at run time instead; any other difference
(an auxiliary output or a branch under ``if self.training:``) is refused with the node where
the paths part.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch.fx as fx
import torch.nn as nn

from cspify.errors import TraceError
from cspify.trace import Traced, networkx_view, symbolic_trace, trace


def trace_in_mode(model: nn.Module, inputs: tuple, leaf_modules: Iterable[str]) -> Traced:
    """``trace`` whose graph follows the mode the model runs in, or a TraceError saying why not."""
    traced = trace(model, inputs, leaf_modules)
    _check_modes(model, leaf_modules, traced.gm)
    return Traced(traced.gm, networkx_view(traced.gm))


def _check_modes(model: nn.Module, leaf_modules: Iterable[str], traced: fx.GraphModule) -> None:
    """Make the traced graph follow the mode the converted model runs in, or refuse.

    Python code reading ``self.training`` is frozen by tracing. Where the graphs traced in
    both modes differ only in flags equal to the mode (``F.dropout(x, p, self.training)``),
    those flags are read from the GraphModule's own ``training`` at run time instead;
    any other difference (a branch on ``self.training``) is refused."""
    flipped = copy.deepcopy(model)
    flipped.train(not model.training)
    mine, theirs = list(traced.graph.nodes), list(symbolic_trace(flipped, leaf_modules).graph.nodes)
    mode_flags = []
    for a, b in zip(mine, theirs):
        if (a.op, a.target, a.name) != (b.op, b.target, b.name):
            break
        flags = _mode_flags((a.args, a.kwargs), (b.args, b.kwargs), model.training)
        if flags is None:
            break
        mode_flags += [(a, flag) for flag in flags]
    else:
        if len(mine) == len(theirs):
            _read_mode_at_run_time(traced, mode_flags)
            return
    first = next((a for a, b in zip(mine, theirs) if _signature(a) != _signature(b)), mine[-1])
    where = next(reversed(first.meta.get("nn_module_stack") or {"": ""}), "")
    at = f" (first at '{first.name}'{f' in {where!r}' if where else ''})"
    raise TraceError(
        f"{type(model).__name__}'s forward takes another path in training mode than in eval mode{at}, "
        "so one traced graph cannot stand in for it.",
        "keep the module that branches on self.training whole with --leaf NAME, or convert a submodule "
        "that does not branch with --scope NAME",
    )


def _signature(node: fx.Node) -> tuple:
    return node.op, str(node.target), repr(node.args), repr(node.kwargs)


def _mode_flags(mine, theirs, training: bool, path=()) -> list | None:
    """Paths of the bool leaves where two argument trees differ only by the mode; None if they
    differ otherwise."""
    if isinstance(mine, bool) and isinstance(theirs, bool) and mine != theirs:
        return [path] if mine == training else None
    if isinstance(mine, (tuple, list)) and isinstance(theirs, (tuple, list)) and len(mine) == len(theirs):
        found = [_mode_flags(a, b, training, (*path, i)) for i, (a, b) in enumerate(zip(mine, theirs))]
        return None if None in found else [p for f in found for p in f]
    if isinstance(mine, dict) and isinstance(theirs, dict) and mine.keys() == theirs.keys():
        found = [_mode_flags(mine[k], theirs[k], training, (*path, k)) for k in mine]
        return None if None in found else [p for f in found for p in f]
    return [] if type(mine) is type(theirs) and repr(mine) == repr(theirs) else None


def _read_mode_at_run_time(gm: fx.GraphModule, mode_flags: list) -> None:
    """Replace each frozen mode flag by a ``get_attr`` of the GraphModule's ``training``."""
    if not mode_flags:
        return
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        training = gm.graph.create_node("get_attr", "training", name="training")
    for node, (where, *path) in mode_flags:
        if where == 0:
            node.args = _replaced(node.args, path, training)
        else:
            node.kwargs = _replaced(node.kwargs, path, training)
    gm.recompile()


def _replaced(tree, path, value):
    """``tree`` with the leaf at ``path`` (indices and keys) replaced by ``value``."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: _replaced(tree[key], rest, value)}
    return type(tree)(_replaced(v, rest, value) if i == key else v for i, v in enumerate(tree))
