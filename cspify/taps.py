"""Intermediate values of a traced model: a stage output, a layer's input, while it runs.

    with tapping(gm, ["layer1_fuse", "relu_5"]) as values:
        logits = model(x)               # gm is model itself, or a submodule of it (a scope)
    values["layer1_fuse"]               # the node's value in that forward pass

    taps = Taps(gm)                     # instrument once, tap different nodes many times
    with taps.values(["relu_2"], stop=True) as values:
        run_until_tapped(model, x)      # stops the forward once every value is in: a prefix only

Calibration and fine-tuning read the stage outputs the conversion record names this way.
The GraphModule itself is not edited: a copy of its graph with a recording call after each
node that may be tapped runs instead of its own (an instance attribute ``forward`` for the
duration of the block), sharing every module and parameter, so gradients reach the model's
parameters as usual. A recorded value is a clone of the node's value when it was computed,
so a later in-place op (``out += identity``, ``ReLU(inplace=True)``) cannot change it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["Taps", "tapping", "run_until_tapped", "StopForward", "node_named", "module_nodes"]

RECORDER = "cspify_taps"  # the recording module's name inside the instrumented copy


class StopForward(Exception):
    """Raised inside a forward pass once every tapped value is recorded (``stop=True``)."""


class _Recorder(nn.Module):
    """Called as ``recorder(name, value)`` after each instrumented node: keeps the values
    asked for, passes nothing on, and ends the pass once all are in when told to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.wanted: frozenset[str] = frozenset()
        self.store: dict[str, object] = {}
        self.stop = self.detach = False

    def forward(self, name: str, value) -> None:
        if name not in self.wanted:
            return
        if isinstance(value, torch.Tensor):
            value = value.detach().clone() if self.detach else value.clone()
        self.store[name] = value
        if self.stop and len(self.store) == len(self.wanted):
            raise StopForward


class Taps:
    """``gm`` instrumented once (every node, or only ``names``) so that ``values`` can
    record any of those nodes in later forward passes."""

    def __init__(self, gm: fx.GraphModule, names: Iterable[str] | None = None) -> None:
        self.gm = gm
        self.recorder = _Recorder()
        only = set(names) if names is not None else None
        known = {node.name for node in gm.graph.nodes}
        missing = sorted((only or set()) - known)
        if missing:
            raise KeyError(f"the model has no node named {missing[0]!r}")
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        graph.output(graph.graph_copy(gm.graph, env))
        root = nn.Module()
        root.add_module(RECORDER, self.recorder)
        for node, copied in env.items():
            if node.op in ("placeholder", "output", "get_attr") or (only is not None and node.name not in only):
                continue
            with graph.inserting_after(copied):
                graph.call_module(RECORDER, (node.name, copied))
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target != RECORDER:
                owner = node.target.split(".")[0]
                if not hasattr(root, owner):
                    setattr(root, owner, getattr(gm, owner))
        self.instrumented = fx.GraphModule(root, graph, gm.__class__.__name__)
        self.names = only if only is not None else known

    @contextmanager
    def values(self, names: Iterable[str], *, stop: bool = False, detach: bool = False):
        """Within the block, each forward of ``gm`` fills the yielded dict with the values of
        the nodes ``names`` (each pass starts it empty). ``stop`` ends the pass once all are
        in (see ``run_until_tapped``); ``detach`` records them without autograd history."""
        wanted = frozenset(names)
        unknown = sorted(wanted - self.names)
        if unknown:
            raise KeyError(f"node {unknown[0]!r} is not instrumented (or not in the model)")
        recorder, gm = self.recorder, self.gm
        store: dict[str, object] = {}
        recorder.wanted, recorder.store, recorder.stop, recorder.detach = wanted, store, stop, detach
        had_forward = "forward" in vars(gm)
        previous = vars(gm).get("forward")
        instrumented = self.instrumented

        def forward(*args, **kwargs):
            store.clear()  # a pass starts empty: ``stop`` waits for this pass's values, not the last one's
            return instrumented.forward(*args, **kwargs)

        gm.forward = forward
        try:
            yield store
        finally:
            recorder.wanted = frozenset()
            if had_forward:
                gm.forward = previous
            else:
                del gm.forward


@contextmanager
def tapping(gm: fx.GraphModule, names: Iterable[str], *, stop: bool = False, detach: bool = False):
    """``Taps(gm, names).values(names, ...)`` in one step: for a single use."""
    names = list(names)
    with Taps(gm, names).values(names, stop=stop, detach=detach) as store:
        yield store


def run_until_tapped(model: nn.Module, *inputs) -> None:
    """Run ``model`` until a ``stop=True`` block has every value it asked for."""
    try:
        model(*inputs)
    except StopForward:
        pass


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node of ``gm`` called ``name``."""
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"the model has no node named {name!r}")


def module_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The call_module nodes of ``gm`` by module path."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found.setdefault(node.target, []).append(node)
    return found
