"""Models whose forward reads ``self.training``: a traced graph freezes the mode it was
traced in, so a converted model would act the same in train and eval mode.

    traced = trace_in_mode(model, inputs)   # as trace(), but checked against the other mode

The model is traced in both modes. Where the graphs differ only in flags equal to the mode
(``F.dropout(x, p, self.training)``, ``stochastic_depth(..., self.training)``), those flags
are read from the GraphModule's own ``training`` at run time instead. Where the paths part
inside a submodule (an attention that caches its bias in eval mode), that submodule is kept
whole, as a leaf, and said so (``Traced.kept_whole``); a difference in the model's own
forward (an auxiliary output under ``if self.training:``) is refused with the node where the
paths part.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch.fx as fx
import torch.nn as nn

from cspify.errors import TraceError
from cspify.ops import is_leaf
from cspify.trace import KEPT_WHOLE_KEY, Traced, kept_whole, networkx_view, symbolic_trace, trace


MAX_KEPT = 32  # submodules kept whole for their modes before the model is refused


def trace_in_mode(model: nn.Module, inputs: tuple, leaf_modules: Iterable[str]) -> Traced:
    """``trace`` whose graph follows the mode the model runs in, or a TraceError saying why not."""
    leaves, kept = list(leaf_modules), {}
    while True:
        traced = trace(model, inputs, leaves)
        try:
            _check_modes(model, leaves, traced.gm, inputs)
            break
        except _Parting as parting:
            if not _keepable(model, leaves, parting.module) or len(kept) >= MAX_KEPT:
                raise parting.error from None
            leaves.append(parting.module)
            kept[parting.module] = "its forward takes another path in training mode than in eval mode"
    traced.gm.meta[KEPT_WHOLE_KEY] = {**kept_whole(traced.gm), **kept}
    return Traced(traced.gm, networkx_view(traced.gm))


class _Parting(Exception):
    """Where the graphs of the two modes part: the module the node is in, and the refusal."""

    def __init__(self, module: str, error: TraceError) -> None:
        super().__init__(error.message)
        self.module, self.error = module, error


def _keepable(model: nn.Module, leaves: list[str], path: str) -> bool:
    """Can the submodule at ``path`` be kept whole: a submodule that is no leaf yet?"""
    if not path or path in leaves:
        return False
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return not is_leaf(module) and bool(list(module.children()) or type(module).forward is not nn.Module.forward)


def _check_modes(model: nn.Module, leaf_modules: Iterable[str], traced: fx.GraphModule, inputs: tuple) -> None:
    """Make the traced graph follow the mode the converted model runs in, or refuse.

    Python code reading ``self.training`` is frozen by tracing. Where the graphs traced in
    both modes differ only in flags equal to the mode (``F.dropout(x, p, self.training)``),
    those flags are read from the GraphModule's own ``training`` at run time instead;
    any other difference (a branch on ``self.training``) is refused."""
    flipped = copy.deepcopy(model)
    flipped.train(not model.training)
    mine, theirs = list(traced.graph.nodes), list(symbolic_trace(flipped, leaf_modules, inputs).graph.nodes)
    mode_flags, i = [], min(len(mine), len(theirs)) - 1  # i: where the paths part
    for at, (a, b) in enumerate(zip(mine, theirs)):
        flags = _mode_flags((a.args, a.kwargs), (b.args, b.kwargs), model.training)
        if (a.op, a.target, a.name) != (b.op, b.target, b.name) or flags is None:
            i = at
            break
        mode_flags += [(a, flag) for flag in flags]
    else:
        if len(mine) == len(theirs):
            _read_mode_at_run_time(traced, mode_flags)
            return
    first = mine[i]
    where = next(reversed(first.meta.get("nn_module_stack") or {"": ""}), "")
    at = f" (first at '{first.name}'{f' in {where!r}' if where else ''})"
    module = _module_path(first) or (_module_path(theirs[i]) if i < len(theirs) else "")
    raise _Parting(module, TraceError(
        f"{type(model).__name__}'s forward takes another path in training mode than in eval mode{at}, "
        "so one traced graph cannot stand in for it.",
        "keep the module that branches on self.training whole with --leaf NAME, or convert a submodule "
        "that does not branch with --scope NAME",
    ))


def _module_path(node: fx.Node) -> str:
    """The path of the innermost module whose forward made ``node`` ('' for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, value = next(reversed(stack.items()))
    path = value[0] if isinstance(value, tuple) and isinstance(value[0], str) else key
    return path.split("@")[0]


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
