"""Tracing: a torch.fx graph of a model, tensor shapes on every node, a networkx view.

    traced = trace(model, (torch.randn(1, 3, 224, 224),))
    traced.gm                      # torch.fx.GraphModule over a deep copy of the model
    traced.nodes["layer1_0_conv1"] # the fx Node, with node.meta["tensor_meta"].shape
    traced.graph                   # networkx.DiGraph of node names, edges along data flow

The model itself is never touched: tracing works on a deep copy, and shapes are
propagated in eval mode without gradients so no BatchNorm statistic moves. A model that is
not ready to trace (uninitialised lazy modules, or a tensor a hook computed that keeps
``copy.deepcopy`` off it) is first made ready on a copy:

    model = ready_to_trace(model, (torch.randn(1, 3, 224, 224),))   # the model itself, or a ready copy
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.lazy import LazyModuleMixin

from cspify.errors import ConfigError, TraceError
from cspify.graph import shape  # importable from here until api.py imports it from cspify.graph
from cspify.narrow import clone_module, has_computed_tensors
from cspify.ops import is_leaf

__all__ = [
    "Traced", "Tracer", "trace", "symbolic_trace", "propagate_shapes", "networkx_view",
    "as_inputs", "eval_mode", "capture_inputs", "shape", "ready_to_trace",
]


class Tracer(fx.Tracer):
    """A tracer that keeps whole the modules with a channel rule (``cspify.ops``) and those
    named as leaves, and remembers which module it is in (for error messages)."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.scope_path: list[str] = []

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or is_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.scope_path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.scope_path.pop()
        return result


@dataclass
class Traced:
    """A traced model: the GraphModule, its nodes by name, and a networkx view."""

    gm: fx.GraphModule
    graph: nx.DiGraph

    # Views of the graph, computed once: the rules and the planner ask for them per node.
    # They describe the graph as traced; the rewrite edits it only after they are done.
    @cached_property
    def nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes}

    @cached_property
    def live(self) -> set[str]:
        """Nodes whose value reaches the output (the rest is dead code, e.g. an unused x.shape)."""
        output = next(n.name for n in self.gm.graph.nodes if n.op == "output")
        return nx.ancestors(self.graph, output) | {output}

    @cached_property
    def constant(self) -> set[str]:
        """Nodes that depend on no model input: parameters and what is computed from them."""
        inputs = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        variable = set(inputs).union(*(nx.descendants(self.graph, n) for n in inputs))
        return set(self.graph.nodes) - variable


def as_inputs(example_inputs) -> tuple:
    """Example inputs as a tuple, whether given as one tensor or several."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Run with every submodule in eval mode and no grad, then restore each flag."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


def symbolic_trace(model: torch.nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """torch.fx tracing of a deep copy of ``model``; errors name the module that failed."""
    if isinstance(model, fx.GraphModule):
        return clone_module(model)
    model = clone_module(model)
    tracer = Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many kinds; all mean "not traceable"
        where = tracer.scope_path[-1] if tracer.scope_path else ""
        raise TraceError(
            f"torch.fx cannot trace {_describe(model, where)}: {_first_line(exc)}.",
            _trace_hint(model, where, leaf_modules),
        ) from exc
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence) -> None:
    """Store ``tensor_meta`` (shape, dtype) on every node by running the inputs through."""
    try:  # ShapeProp prints a traceback of its own before it raises: keep it off the user's screen
        with eval_mode(gm), redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        shapes = ", ".join(_shape_of(x) for x in example_inputs)
        raise TraceError(
            f"the model does not run on example inputs of shape {shapes}: {_first_line(exc.__cause__ or exc)}.",
            "give the shape the model expects with --input-shape, or define example_inputs() in the model file",
        ) from exc


def capture_inputs(model: torch.nn.Module, example_inputs, scope: str) -> tuple[torch.nn.Module, tuple]:
    """The submodule at ``scope`` and the inputs it receives when the whole model runs.

    Runs a deep copy of the model once (eval mode, no grad) with a pre-hook on the scope.
    """
    try:
        part = model.get_submodule(scope)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(f"the model has no submodule {scope!r}.", f"its top-level submodules are: {children}") from None
    runner = clone_module(model)
    calls = []
    handle = runner.get_submodule(scope).register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    try:
        with eval_mode(runner):
            runner(*as_inputs(example_inputs))
    except Exception as exc:
        shapes = ", ".join(_shape_of(x) for x in as_inputs(example_inputs))
        raise TraceError(
            f"the model does not run on example inputs of shape {shapes}: {_first_line(exc)}.",
            "give the shape the model expects with --input-shape",
        ) from exc
    finally:
        handle.remove()
    if not calls:
        raise ConfigError(f"submodule {scope!r} is never called in a forward pass.", "choose a submodule the model uses")
    args, kwargs = calls[0]
    if kwargs:
        raise TraceError(
            f"submodule {scope!r} is called with keyword arguments ({', '.join(kwargs)}), which cspify cannot trace.",
            "choose a submodule that takes its inputs as positional tensors",
        )
    return part, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def ready_to_trace(model: torch.nn.Module, example_inputs) -> torch.nn.Module:
    """``model`` itself where it is ready to trace, else a copy that is: its lazy modules
    (``nn.LazyConv2d`` before a first forward) initialised by one run of the example inputs
    (eval mode, no grad), and tensors that hooks computed with gradients (the older
    ``torch.nn.utils.weight_norm``'s ``weight``) detached, so that it can be copied.
    The model itself is never touched."""
    lazy = [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if not lazy and not has_computed_tensors(model):
        return model
    ready = clone_module(model)
    if lazy:
        try:
            with eval_mode(ready):
                ready(*as_inputs(example_inputs))
        except Exception as exc:
            shapes = ", ".join(_shape_of(x) for x in as_inputs(example_inputs))
            raise TraceError(
                f"the model's lazy modules ({', '.join(lazy[:3])}) cannot be initialised, as it does not run on "
                f"example inputs of shape {shapes}: {_first_line(exc)}.",
                "give the shape the model expects with --input-shape, or run the model once before converting it",
            ) from exc
    return ready


def networkx_view(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph of node names with an edge from each input node to each user."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        for user in node.users:
            graph.add_edge(node.name, user.name)
    return graph


def trace(model: torch.nn.Module, example_inputs, leaf_modules: Iterable[str] = ()) -> Traced:
    """Trace, propagate shapes and build the networkx view: the pipeline's first step."""
    gm = symbolic_trace(model, leaf_modules)
    propagate_shapes(gm, as_inputs(example_inputs))
    return Traced(gm, networkx_view(gm))


def _describe(model: torch.nn.Module, where: str) -> str:
    if not where:
        return f"the model ({type(model).__name__})"
    return f"module '{where}' ({type(model.get_submodule(where)).__name__})"


def _trace_hint(model: torch.nn.Module, where: str, leaf_modules: Iterable[str]) -> str:
    """Name the largest submodules that do trace, so the user can convert one of them."""
    traceable = []
    for name, child in model.named_children():
        if where and not where.startswith(name):
            traceable.append(f"{name} ({type(child).__name__})")
            continue
        try:
            Tracer(leaf_modules).trace(clone_module(child))
            traceable.append(f"{name} ({type(child).__name__})")
        except Exception:
            continue
    leaf = f"keep '{where}' opaque with --leaf {where} if no stage runs through it, or " if where else ""
    if traceable:
        return (
            f"{leaf}convert a traceable submodule with --scope NAME (scope= in the API); "
            f"traceable submodules: {', '.join(traceable[:5])}"
        )
    return f"{leaf}make the forward free of data-dependent Python control flow"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")


def _shape_of(x) -> str:
    return "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
