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

The example inputs bind to the forward's positional parameters: a ``*args`` or ``**kwargs``
beside them (``forward(self, x, *args, **kwargs)``) is traced empty. A submodule torch.fx
cannot trace, in eval or in training mode (a detection head's dynamic code), is kept whole
as a leaf, and said so:

    traced.kept_whole              # {"model.22": "torch.fx cannot trace it: its forward branches ..."}
"""

from __future__ import annotations

import copy
import inspect
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
    "as_inputs", "eval_mode", "capture_inputs", "shape", "ready_to_trace", "kept_whole", "device_of", "traced_original",
    "traced_originals", "captured_inputs",
]

KEPT_WHOLE_KEY = "cspify_kept_whole"  # GraphModule.meta entry: the submodules tracing kept whole, and why


class Tracer(fx.Tracer):
    """A tracer that keeps whole the modules with a channel rule (``cspify.ops``) and those
    named as leaves, and remembers which module it is in (the one to keep whole when
    tracing fails).

    The root's ``*args`` and ``**kwargs`` are traced empty where its forward has positional
    parameters for the inputs; the parts of a split whose count its arguments fix can be
    iterated (``list(t.chunk(2, 1))``); a GraphModule's own ``call_module`` targets stay
    leaves, so that tracing it again gives its graph back."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.scope_path: list[str] = []

    def trace(self, root, concrete_args=None):
        if isinstance(root, fx.GraphModule):
            self.leaf_names |= {n.target for n in root.graph.nodes if n.op == "call_module"}
        return super().trace(root, concrete_args)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if not _has_positional(root_fn, is_module):
            return fn, args
        bound = []
        for arg in args:  # the *args and **kwargs placeholders become () and {}
            if isinstance(arg, fx.Proxy) and arg.node.op == "placeholder" and str(arg.node.target).startswith("*"):
                self.graph.erase_node(arg.node)
                arg = {} if arg.node.target.startswith("**") else ()
            bound.append(arg)
        return fn, bound

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Parts(node, self) if _parts(node) is not None else super().proxy(node)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or is_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.scope_path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.scope_path.pop()
        return result


class _Parts(fx.Proxy):
    """The result of a split whose number of parts its arguments fix: ``len`` and iteration
    work on it (``list(t.chunk(2, 1))``, ``for part in t.split([8, 8], 1)``)."""

    def __len__(self) -> int:
        return _parts(self.node)

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])


@dataclass
class Traced:
    """A traced model: the GraphModule, its nodes by name, and a networkx view."""

    gm: fx.GraphModule
    graph: nx.DiGraph

    @property
    def kept_whole(self) -> dict[str, str]:
        """The submodules tracing kept whole as leaves because torch.fx cannot trace them, and why."""
        return kept_whole(self.gm)

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


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def symbolic_trace(model: torch.nn.Module, leaf_modules: Iterable[str] = (), example_inputs=None) -> fx.GraphModule:
    """torch.fx tracing of a deep copy of ``model``.

    A submodule whose tracing fails, in the model's mode or the other one (a head that
    returns early in training), is kept whole as a leaf and tracing starts again, so that
    both modes trace to one graph; ``kept_whole(gm)`` lists those modules and why.
    Only a failure in the model's own forward is an error, which names its cause.
    An example input that is a list, tuple or dict of tensors (a detection head's feature
    maps) is traced as one placeholder per tensor, the GraphModule taking it as it comes."""
    if isinstance(model, fx.GraphModule):
        return clone_module(model)
    concrete = _containers(model, as_inputs(example_inputs)) if example_inputs is not None else None
    leaves, kept = list(leaf_modules), {}
    while True:
        copy = clone_module(model)  # a failed trace may leave proxies on the modules it ran
        tracer = Tracer(leaves)
        try:
            graph = _trace_both_modes(tracer, copy, concrete)
            break
        except Exception as exc:  # torch.fx raises many kinds; all mean "not traceable"
            where = tracer.scope_path[-1] if tracer.scope_path else ""
            if where and where not in leaves:  # a submodule's forward failed: keep it whole
                leaves.append(where)
                kept[where] = f"torch.fx cannot trace it: {_cause(exc) or _first_sentence(exc)}"
                continue
            raise TraceError(
                f"torch.fx cannot trace the model ({type(model).__name__}){_kept_note(model, kept)}: "
                f"{_first_sentence(exc)}.",
                _trace_hint(model, leaves, exc),
            ) from exc
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.meta[KEPT_WHOLE_KEY] = kept
    return gm


def kept_whole(gm: fx.GraphModule) -> dict[str, str]:
    """The submodules ``symbolic_trace`` kept whole as leaves since torch.fx cannot trace them, and why."""
    return dict(getattr(gm, "meta", {}).get(KEPT_WHOLE_KEY, {}))


def _trace_both_modes(tracer: Tracer, model: torch.nn.Module, concrete_args: dict | None = None) -> fx.Graph:
    """The graph of ``model`` in its own mode, once its submodules trace in the other mode
    too (a failure of the model's own forward in the other mode is left to ``cspify.modes``)."""
    flags = {m: m.training for m in model.modules()}
    model.train(not model.training)
    try:
        tracer.trace(model, concrete_args)
    except Exception:
        if tracer.scope_path:  # a submodule's: keep it whole
            raise
    finally:
        for m, flag in flags.items():
            m.training = flag
    return tracer.trace(model, concrete_args)


def _containers(model: torch.nn.Module, inputs: tuple) -> dict | None:
    """torch.fx's ``concrete_args`` for the inputs that are lists, tuples or dicts of
    tensors: the structure with a placeholder (``fx.PH``) for every tensor, by the name of
    the positional parameter it binds to; None where every input is a tensor."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    containers = {params[i]: torch.utils._pytree.tree_map(lambda _: fx.PH, x)
                  for i, x in enumerate(inputs[: len(params)]) if isinstance(x, (list, tuple, dict))}
    return containers or None


# Splits whose number of parts their first argument fixes: name -> (keyword, count of an
# int, count of a list). chunk(n) has fewer than n parts for some sizes (6 channels in 4
# chunks give 3) but never for n = 2 and a size of 2 or more: only chunk(2) counts.
_SPLITS = {
    "chunk": ("chunks", lambda n: 2 if n == 2 else None, None),
    "tensor_split": ("indices_or_sections", lambda n: n, lambda s: len(s) + 1),
    "split": ("split_size_or_sections", None, len),
    "split_with_sizes": ("split_sizes", None, len),
}


def _parts(node: fx.Node) -> int | None:
    """How many tensors the split at ``node`` gives, where its arguments say; else None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in _SPLITS:
        return None
    keyword, of_int, of_list = _SPLITS[name]
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(keyword, node.kwargs.get("split_size"))
    if isinstance(arg, int) and not isinstance(arg, bool) and of_int:
        return of_int(arg)  # None where the int does not fix the count
    if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg) and of_list:
        return of_list(arg)
    return None


def _has_positional(root_fn, is_module: bool) -> bool:
    """Does the forward take a positional parameter (besides ``self``) for the example inputs?"""
    try:
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[int(is_module):]
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


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
    calls = _first_calls(model, example_inputs, [scope])[scope]
    if calls is None:
        raise ConfigError(f"submodule {scope!r} is never called in a forward pass.", "choose a submodule the model uses")
    args, kwargs = calls
    if kwargs:
        raise TraceError(
            f"submodule {scope!r} is called with keyword arguments ({', '.join(kwargs)}), which cspify cannot trace.",
            "choose a submodule that takes its inputs as positional tensors",
        )
    return part, args


def captured_inputs(model: torch.nn.Module, example_inputs, scopes: list[str]) -> dict[str, tuple | None]:
    """``capture_inputs`` for many submodules in one run of the model: per scope, the inputs
    its first call receives, or None where it is never called or takes keyword arguments."""
    return {scope: (calls[0] if calls is not None and not calls[1] else None)
            for scope, calls in _first_calls(model, example_inputs, scopes).items()}


def _first_calls(model: torch.nn.Module, example_inputs, scopes: list[str]) -> dict[str, tuple | None]:
    """(args, kwargs) of each scope's first call in one eval-mode run of a deep copy of the model."""
    runner = clone_module(model)
    calls = {}

    def hook(scope):
        def record(module, args, kwargs):
            calls.setdefault(scope, (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        return record

    handles = [runner.get_submodule(scope).register_forward_pre_hook(hook(scope), with_kwargs=True) for scope in scopes]
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
        for handle in handles:
            handle.remove()
    return {scope: calls.get(scope) for scope in scopes}


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
    gm = symbolic_trace(model, leaf_modules, example_inputs)
    propagate_shapes(gm, as_inputs(example_inputs))
    return Traced(gm, networkx_view(gm))


def _kept_note(model: torch.nn.Module, kept: dict[str, str]) -> str:
    if not kept:
        return ""
    names = ", ".join(f"'{name}' ({type(model.get_submodule(name)).__name__})" for name in list(kept)[:3])
    return f" even with {names}{' and others' if len(kept) > 3 else ''} kept whole"


# What torch.fx's messages mean in the user's code: (words of the message, the cause)
_CAUSES = (
    ("cannot be used as inputs to control flow",
     "its forward branches on a traced value, a tensor or its shape (data-dependent Python control flow)"),
    ("cannot be iterated",
     "its forward iterates over or unpacks a traced value (a loop over a tensor, a, b = t, or *t)"),
    ("len(", "its forward takes len() of a traced value"),
)


def _cause(exc: BaseException) -> str:
    text = str(exc)
    return next((cause for words, cause in _CAUSES if words in text), "")


def _trace_hint(model: torch.nn.Module, leaf_modules: Iterable[str], exc: BaseException) -> str:
    """The cause in the model's own forward, then its largest submodules that do trace, so
    that the user can convert one of them."""
    traceable = []
    for name, child in model.named_children():
        inner = [leaf[len(name) + 1:] for leaf in leaf_modules if leaf.startswith(f"{name}.")]
        try:
            symbolic_trace(child, inner)
            traceable.append(f"{name} ({type(child).__name__})")
        except Exception:
            continue
    cause = f"{_cause(exc)}; " if _cause(exc) else ""
    if traceable:
        return (
            f"{cause}convert a traceable submodule with --scope NAME (scope= in the API); "
            f"traceable submodules: {', '.join(traceable[:5])}"
        )
    return f"{cause}change that part of the model's own forward (its submodules that torch.fx cannot trace are kept whole)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")


def _first_sentence(exc: BaseException) -> str:
    return _first_line(exc).split(". ")[0]


def _shape_of(x) -> str:
    return "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def traced_originals(original: torch.nn.Module, x: torch.Tensor, conversions: list, device
                     ) -> tuple[torch.nn.Module, list[fx.GraphModule]]:
    """``traced_original`` for every conversion ``cspify.record.find_conversions`` lists, in
    one whole model: (the whole model to run, the traced graph of each conversion, in order).
    The parts (converted inside modules tracing keeps whole) are traced where they lie, each
    fed what the whole model hands it on ``x``."""
    (scope, record), parts = conversions[0], conversions[1:]
    whole, traced = traced_original(original, x, record.leaf_modules, scope, device)
    graphs = [traced.gm]  # tracing copies the modules it keeps whole: the parts go into the copies
    inputs = captured_inputs(original, (x.to(device_of(original)),), [path for path, _ in parts]) if parts else {}
    for path, part_record in parts:
        gm = trace(original.get_submodule(path), inputs[path], part_record.leaf_modules).gm
        gm = gm.to(device).eval().requires_grad_(False)
        parent, _, name = path.rpartition(".")
        setattr(whole.get_submodule(parent) if parent else whole, name, gm)
        graphs.append(gm)
    return whole, graphs


def traced_original(original: torch.nn.Module, x: torch.Tensor, leaf_modules: Iterable[str], scope: str | None,
                    device) -> tuple[torch.nn.Module, Traced]:
    """The original, traced as ``convert`` traced it (the same ``leaf_modules``; with a
    ``scope``, only the submodule there, fed what the whole model hands it on ``x``), on
    ``device``, frozen, in eval mode: (the whole model to run, the Traced part whose node
    names the conversion record uses). The user's model is left as it is."""
    source = device_of(original)
    if scope:
        part, inputs = capture_inputs(original, (x.to(source),), scope)
        traced = trace(part, inputs, leaf_modules)
        whole = copy.deepcopy(original)
        parent, _, name = scope.rpartition(".")
        setattr(whole.get_submodule(parent) if parent else whole, name, traced.gm)
    else:
        traced = trace(original, (x.to(source),), leaf_modules)
        whole = traced.gm
    whole.to(device).eval()
    for p in whole.parameters():
        p.requires_grad_(False)
    return whole, traced
