"""Intermediate values of a traced model: a stage output, a layer's input, while it runs.

    with tapping(gm, ["layer1_fuse", "relu_5"]) as values:
        logits = model(x)               # gm is model itself, or a submodule of it (a scope)
    values["layer1_fuse"]               # the node's value in that forward pass

    with tapping(gm, ["relu_2"], stop=True) as values:
        run_until_tapped(model, x)      # stops the forward once every value is in: a prefix only

Calibration and fine-tuning read the stage outputs the conversion record names this way.
The GraphModule itself is not edited: a copy of its graph with one small recording module
after each tapped node runs instead of its own, sharing every module and parameter, so
gradients reach the model's parameters as usual. A recorded value is a clone of the node's
value when it was computed, so a later in-place op (``out += identity``, ``ReLU(inplace=True)``)
cannot change it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["tapping", "run_until_tapped", "StopForward", "node_named", "module_nodes"]


class StopForward(Exception):
    """Raised inside a forward pass once every tapped value is recorded (``stop=True``)."""


class _Record(nn.Module):
    """Records its input under ``name`` in ``store`` and passes it on unchanged."""

    def __init__(self, store: dict, name: str, wanted: int, stop: bool, detach: bool) -> None:
        super().__init__()
        self.store, self.name, self.wanted, self.stop, self.detach = store, name, wanted, stop, detach

    def forward(self, x):
        self.store[self.name] = x.detach().clone() if self.detach else x.clone()
        if self.stop and len(self.store) >= self.wanted:
            raise StopForward
        return x


@contextmanager
def tapping(gm: fx.GraphModule, names: Iterable[str], *, stop: bool = False, detach: bool = False):
    """Within the block, each forward of ``gm`` fills the yielded dict with the values of
    the nodes ``names`` (a fresh pass overwrites them). ``stop`` ends the pass early once
    all are in (see ``run_until_tapped``); ``detach`` records them without autograd history."""
    names = list(dict.fromkeys(names))
    store: dict[str, torch.Tensor] = {}
    known = {node.name for node in gm.graph.nodes}
    for name in names:
        if name not in known:
            raise KeyError(f"the model has no node named {name!r}")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if stop:  # the nodes up to the last tapped one, in order: nothing after it would run
        left = set(names)
        for node in gm.graph.nodes:
            if not left and node.op != "placeholder":
                break
            env[node] = graph.node_copy(node, lambda n: env[n])
            left.discard(node.name)
        graph.output(None)
    else:
        graph.output(graph.graph_copy(gm.graph, env))
    copied = {node.name: new for node, new in env.items()}
    root = nn.Module()
    for i, name in enumerate(names):
        node = copied[name]
        target = f"cspify_tap_{i}"
        root.add_module(target, _Record(store, name, len(names), stop, detach))
        with graph.inserting_after(node):
            graph.call_module(target, (node,))
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owner = node.target.split(".")[0]
            if not hasattr(root, owner):
                setattr(root, owner, getattr(gm, owner))
    tapped = fx.GraphModule(root, graph, gm.__class__.__name__)
    had_forward = "forward" in vars(gm)
    previous = vars(gm).get("forward")

    def forward(*args, **kwargs):
        store.clear()  # a pass starts empty: ``stop`` waits for this pass's values, not the last one's
        return tapped.forward(*args, **kwargs)

    gm.forward = forward
    try:
        yield store
    finally:
        if had_forward:
            gm.forward = previous
        else:
            del gm.forward


def run_until_tapped(model: nn.Module, *inputs) -> None:
    """Run ``model`` until a ``tapping(..., stop=True)`` block has every value it asked for."""
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
