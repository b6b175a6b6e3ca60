"""A traced model's forward resumed from cached values, so that calibration's many passes
over the images compute only what lies after the stage being fitted.

    replay = Replay(model, gm, taps)      # gm: the traced GraphModule (model itself, or its scope)
    replay.start("layer2_base", batches)  # one pass: what the rest of the graph reads from before it
    replay.values(i, batches[i], ["layer2_0_conv1", "relu_7"])   # computed from that cache

``start(node)`` runs each batch once up to the frontier of ``node``: the nodes that are not
downstream of it but that nodes downstream of it read (the node itself, skip connections
from before it). Their values are kept; ``values`` then runs a GraphModule made of only
the nodes between that frontier and the nodes asked for, sharing every module with ``gm``,
so refitted weights downstream are seen at once and nothing upstream runs again. Where the
cache would pass ``budget`` bytes, or the frontier holds an input that cannot be recorded (a
scoped submodule's inputs), every pass runs the whole model as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from cspify.taps import Taps, run_until_tapped

__all__ = ["Replay", "CACHE_BYTES"]

CACHE_BYTES = 2 << 30  # the frontier values kept for all batches at most


class Replay:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, taps: Taps, budget: int | None = None) -> None:
        self.model, self.gm, self.taps = model, gm, taps
        self.budget = CACHE_BYTES if budget is None else budget
        self.nodes = {node.name: node for node in gm.graph.nodes}
        self.frontier: list[str] = []
        self.cache: list[dict[str, object]] | None = None
        self.downstream: set[str] = set()
        self._graphs: dict[tuple[str, ...], fx.GraphModule | None] = {}

    def start(self, name: str, batches: Sequence[torch.Tensor]) -> bool:
        """Cache the frontier of node ``name`` for every batch; False where that cannot be done
        (then ``values`` runs the whole model)."""
        self.cache, self._graphs = None, {}
        node = self.nodes.get(name)
        if node is None:
            return False
        self.downstream = _downstream(node)
        frontier = [n for n in self.gm.graph.nodes if n.name not in self.downstream and n.op != "get_attr"
                    and any(u.name in self.downstream for u in n.users)]
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        inputs = [n for n in frontier if n.op == "placeholder"]
        # the model's own input is the batch; a scoped submodule's inputs are not recorded
        if inputs and (self.model is not self.gm or len(placeholders) != 1):
            return False
        self.frontier = [n.name for n in frontier]
        tapped = [n.name for n in frontier if n.op != "placeholder"]
        cache, size = [], 0
        for x in batches:
            values = {}
            if tapped:
                with torch.no_grad(), self.taps.values(tapped, stop=True, detach=True) as store:
                    run_until_tapped(self.model, x)
                values = dict(store)
            values.update({n.name: x for n in inputs})
            size += sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))
            if size > self.budget:
                return False
            cache.append(values)
        self.cache = cache
        return True

    def keep_for(self, changing: Sequence[str]) -> None:
        """Drop the cache unless every node in ``changing`` (layers about to be refitted) lies
        downstream of the start: their new weights must not reach a cached value."""
        if self.cache is not None and any(n not in self.downstream for n in changing):
            self.cache, self._graphs = None, {}

    def values(self, index: int, x: torch.Tensor, names: Sequence[str]) -> dict[str, object]:
        """The values of nodes ``names`` for batch ``index`` (input ``x``), detached."""
        names = list(dict.fromkeys(names))
        sub = self._graph(tuple(names)) if self.cache is not None else None
        if sub is None:
            with torch.no_grad(), self.taps.values(names, stop=True, detach=True) as store:
                run_until_tapped(self.model, x)
            return dict(store)
        cached = self.cache[index]
        with torch.no_grad():  # clones: an in-place op in the part replayed must not change the cache
            out = sub(*[_clone(cached[n]) for n in sub.meta["inputs"]])
        return dict(zip(names, out))

    def _graph(self, names: tuple[str, ...]) -> fx.GraphModule | None:
        """The nodes between the frontier and ``names`` as a GraphModule whose inputs are the
        frontier values they read (None: a node asked for is not downstream of the start)."""
        if names in self._graphs:
            return self._graphs[names]
        frontier = set(self.frontier)
        if any(n not in self.downstream and n not in frontier for n in names):
            self._graphs[names] = None
            return None
        needed, todo = set(), [self.nodes[n] for n in names]
        while todo:
            node = todo.pop()
            if node.name in needed:
                continue
            needed.add(node.name)
            if node.name not in frontier:
                todo += node.all_input_nodes
        graph, env, inputs = fx.Graph(), {}, []
        for node in self.gm.graph.nodes:
            if node.name not in needed:
                continue
            if node.name in frontier:
                env[node] = graph.placeholder(node.name)
                inputs.append(node.name)
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(graph.call_function(_clone, (env[self.nodes[n]],)) for n in names))
        sub = fx.GraphModule(self.gm, graph)
        sub.meta["inputs"] = inputs
        self._graphs[names] = sub
        return sub


def _downstream(node: fx.Node) -> set[str]:
    """Names of the nodes that read ``node``, directly or not."""
    found, todo = set(), list(node.users)
    while todo:
        n = todo.pop()
        if n.name not in found and n.op != "output":
            found.add(n.name)
            todo += n.users
    return found


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
