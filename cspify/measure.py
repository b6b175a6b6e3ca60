"""Measurement of one model: fvcore flops, params and activations, and bytes of memory
traffic per node, kept per module and per node so a report can roll them up per stage.

    m = measure(model, torch.randn(1, 3, 224, 224))
    m.totals.flops, m.totals.params, m.totals.activations, m.totals.memory_bytes   # totals
    m.totals.cio_bytes, m.totals.peak_bytes              # HarDNet's CIO, estimated peak
    m.totals.max_layer_flops, m.totals.layer_balance     # the computational bottleneck
    m.stage(["layer1_1_conv1", "layer1_1_bn1"])          # the same figures for some nodes

Every figure is one entry of ``FIGURES``: its key, label, unit, what its values are kept
per and how they roll up into a stage's figure and the total, and where the report shows
it. ``Figures`` (one attribute per entry), ``measure``, ``Measurement.stage``, the report's
tables, JSON and Markdown and ``plot_report`` all read the table: a new figure is one entry.

fvcore counts one fused multiply-add as one flop. Memory traffic is what each op reads
and writes (input and output tensors, its own weights) at the traced dtype; ops that
only make a view (narrow, view, getitem) or no tensor (size) move nothing: the op
table's ``returns`` fact (``cspify.ops``) says which.

The memory figures, all in bytes at the traced dtype:

- ``cio_bytes``: HarDNet's CIO, the sum over conv layers of their input plus output
  feature-map sizes (weights not counted).
- ``peak_bytes``: the peak activation memory of a forward pass, from tensor lifetimes in
  the traced graph: a tensor is alive from the node that makes it until its last user has
  run (graph outputs until the end; the inputs from the start); views and in-place ops
  share their input's storage, so they keep it alive instead of adding to it. Weights are
  not counted. A stage's figure is the peak while its nodes run.
- ``measured_peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` over one forward
  pass above what was allocated before it; ``None`` (not measured) on CPU.

The computational bottleneck: ``max_layer_flops`` is the largest flops of one layer (a
conv or linear module), ``layer_balance`` the largest over the mean of those layers
(1.0: the load is perfectly even).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, make_dataclass
from functools import cached_property
from numbers import Number

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():  # fvcore's import still decorates with torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import parameter_count
    from fvcore.nn.activation_count import _DEFAULT_SUPPORTED_OPS as _fvcore_activation_handles
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS as _fvcore_flop_handles
    from fvcore.nn.jit_analysis import JitModelAnalysis

from cspify.ops import exact_op
from cspify.trace import as_inputs, eval_mode, trace

FLOP_NOTE = "fvcore counts one fused multiply-add as one flop"

# Layers for the bottleneck figures, and the convs HarDNet's CIO sums over.
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
CONV_FUNCTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}


@dataclass(frozen=True)
class FigureSpec:
    """One report figure: how it is measured, rolled up and shown.

    ``per`` says what ``values(sources)`` returns and so how a stage and the total roll up:
    "module" {module name: value}: a stage rolls up the modules its nodes call, the total is
    the whole model's (module ""); "node" {node name: value}: a stage rolls up its nodes, the
    total all nodes; "layer" {conv/linear module name: value}: a stage rolls up the layers its
    nodes call, the total all layers; "model": one value for the whole model, a stage has ``empty``.
    """

    key: str                              # the Figures attribute, and its JSON key
    label: str                            # its row in the report's totals
    unit: str                             # "" a count, "B" bytes (both with SI prefixes), "ratio": two decimals
    per: str                              # "module", "node", "layer" or "model" (above)
    values: Callable[[Sources], object]   # its values per module, node or layer (or the model's one)
    rollup: Callable[[list], object] = sum  # a stage's (or all) values -> the figure
    empty: int | float | None = 0         # the figure of nothing (None: not measured)
    table: str = ""                       # the per-stage table that shows it: "stages", "memory" or none
    column: str = ""                      # its heading there
    saved: bool = True                    # with a "saved" column beside it there
    plot: tuple[str, str] | None = None   # a plot_report panel: (y label, "{}" the SI prefix; title)
    note: str = ""                        # what it means, in the report's closing note

    @property
    def per_stage(self) -> bool:
        """Whether a stage has this figure (the report's rows and saved percentages show it)."""
        return self.per != "model"


def largest(values: list) -> int:
    return max(values, default=0)


def layer_balance(layer_flops: list[int]) -> float:
    """How uneven the load is: the largest layer's flops over the mean (layers that do any)."""
    working = [f for f in layer_flops if f > 0]
    return max(working) * len(working) / sum(working) if working else 0.0


# Every report figure, in the order the report shows them. An entry: key, label, unit, per,
# values (FigureSpec above), then how it rolls up and where the report shows it.
FIGURES = (
    FigureSpec("flops", "flops", "", "module", lambda s: s.fvcore[0],
               table="stages", column="flops", plot=("{}FLOPs (1 multiply-add = 1 flop)", "Compute per stage")),
    FigureSpec("params", "params", "", "module", lambda s: parameter_count(s.gm),
               table="stages", column="params"),
    FigureSpec("activations", "activations", "", "module", lambda s: s.fvcore[1]),
    FigureSpec("memory_bytes", "memory traffic", "B", "node", lambda s: s.each_node(node_traffic),
               table="stages", column="traffic", plot=("memory traffic ({}B read + written)", "Memory traffic per stage"),
               note="memory traffic = bytes each op reads and writes"),
    FigureSpec("cio_bytes", "CIO", "B", "node", lambda s: s.each_node(conv_io),
               table="memory", column="CIO", note="CIO = bytes of conv input plus output feature maps"),
    FigureSpec("peak_bytes", "peak activations", "B", "node", lambda s: live_bytes(s.gm), rollup=largest,
               table="memory", column="peak act.",
               note="peak = activation bytes alive at once, from tensor lifetimes in the traced graph"),
    FigureSpec("max_layer_flops", "largest layer", "", "layer", lambda s: s.layer_flops, rollup=largest,
               table="memory", column="largest layer", saved=False),
    FigureSpec("layer_balance", "layer max/mean", "ratio", "layer", lambda s: s.layer_flops, rollup=layer_balance,
               empty=0.0, table="memory", column="max/mean", saved=False,
               note="layer max/mean = largest conv/linear flops over the mean (1.0 is even)"),
    FigureSpec("measured_peak_bytes", "peak measured", "B", "model", lambda s: measured_peak(s.gm, s.inputs),
               empty=None),
)


def _to_dict(self) -> dict:
    def plain(value):
        if value is None:
            return None
        return round(float(value), 3) if isinstance(value, float) else int(value)

    return {k: plain(v) for k, v in vars(self).items()}


# One attribute per FIGURES entry, in its order, defaulting to the entry's ``empty``.
Figures = make_dataclass("Figures", [(f.key, int | float | None, field(default=f.empty)) for f in FIGURES],
                         namespace={"to_dict": _to_dict})
Figures.__module__ = __name__
Figures.__doc__ = """The numbers a report compares, one per FIGURES entry: counts are integers,
``layer_balance`` a ratio, ``measured_peak_bytes`` ``None`` where it was not measured (CPU, a stage)."""


class Sources:
    """What the FIGURES entries measure from: the traced model, its inputs, and fvcore's
    flops and activations per module (one jit trace for both)."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple):
        self.gm, self.inputs = gm, inputs

    @cached_property
    def fvcore(self) -> tuple[dict[str, int], dict[str, int]]:
        with eval_mode(self.gm):
            return fvcore_counts(self.gm, self.inputs)

    @cached_property
    def layer_flops(self) -> dict[str, int]:
        """The flops of every conv and linear module, called or not."""
        return {name: self.fvcore[0].get(name, 0) for name, m in self.gm.named_modules() if isinstance(m, LAYER_TYPES)}

    def each_node(self, count: Callable[[fx.Node, fx.GraphModule], int]) -> dict[str, int]:
        return {node.name: count(node, self.gm) for node in self.gm.graph.nodes}


@dataclass
class Measurement:
    """Totals plus what a per-stage roll-up needs: each figure's values per module, node
    or layer (``values[key]``), and the module each node calls."""

    totals: Figures
    values: dict[str, object]
    node_targets: dict[str, str]
    nodes: dict[str, None]  # every node name, in graph order

    @property
    def flops(self) -> int:
        return self.totals.flops

    @property
    def node_bytes(self) -> dict[str, int]:
        """Memory traffic per node (every node, in graph order)."""
        return self.values["memory_bytes"]

    @property
    def layer_flops(self) -> dict[str, int]:
        """Flops per conv and linear module."""
        return self.values["max_layer_flops"]

    def stage(self, nodes: Iterable[str]) -> Figures:
        """Figures of a set of nodes: rolled up over them, or over the modules they call."""
        nodes = [n for n in nodes if n in self.nodes]
        modules = {self.node_targets[n] for n in nodes if n in self.node_targets}
        figures = {}
        for f in FIGURES:
            values = self.values[f.key]
            names = nodes if f.per == "node" else modules
            figures[f.key] = f.empty if f.per == "model" else f.rollup([values[n] for n in names if n in values])
        return Figures(**figures)


def measure(model: nn.Module, example_inputs, leaf_modules: Iterable[str] = ()) -> Measurement:
    """Measure a model (never modified: everything runs on a traced deep copy, eval mode)."""
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, leaf_modules).gm
    sources = Sources(gm, inputs)
    values = {f.key: f.values(sources) for f in FIGURES}
    totals = Figures(**{f.key: total(f, values[f.key]) for f in FIGURES})
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
    return Measurement(totals, values, targets, dict.fromkeys(n.name for n in gm.graph.nodes))


def total(figure: FigureSpec, values) -> int | float | None:
    """A figure of the whole model from its values (``FigureSpec.per``)."""
    if figure.per == "model":
        return values
    if figure.per == "module":
        return values[""]
    return figure.rollup(list(values.values()))


def fvcore_counts(model: nn.Module, inputs: tuple) -> tuple[dict[str, int], dict[str, int]]:
    """fvcore's flops and activations per module, as FlopCountAnalysis and
    ActivationCountAnalysis count them, from one jit trace instead of one each."""
    analysis = JitModelAnalysis(model, inputs)
    analysis.set_op_handle(**FVCORE_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    counts = analysis.by_module_and_operator()
    return ({name: c["flops"] for name, c in counts.items()},
            {name: c["activations"] for name, c in counts.items()})


def _both(flop_handle, activation_handle):
    """One fvcore op handle that counts flops and activations under their own keys."""
    def handle(inputs, outputs) -> Counter:
        counts = Counter()
        for key, count in (("flops", flop_handle), ("activations", activation_handle)):
            if count is not None:
                value = count(inputs, outputs)
                counts[key] = sum(value.values()) if not isinstance(value, Number) else value
        return counts
    return handle


# fvcore keeps the op handles its two analyses use private (``_DEFAULT_SUPPORTED_OPS`` of
# ``flop_count`` and ``activation_count``): this is the one place cspify reads them.
# tests/test_measure_figures.py fails if the counts stop matching fvcore's own analyses.
FVCORE_HANDLES = {
    op: _both(_fvcore_flop_handles.get(op), _fvcore_activation_handles.get(op))
    for op in {*_fvcore_flop_handles, *_fvcore_activation_handles}
}


def conv_io(node: fx.Node, gm: fx.GraphModule) -> int:
    """HarDNet's CIO of one node: bytes of a conv's input plus output feature maps, else 0."""
    if node.op == "call_module":
        is_conv = isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
    else:
        is_conv = node.op == "call_function" and node.target in CONV_FUNCTIONS
    if not is_conv or not node.args or not isinstance(node.args[0], fx.Node):
        return 0
    return _bytes(node.args[0].meta.get("tensor_meta")) + _bytes(node.meta.get("tensor_meta"))


def live_bytes(gm: fx.GraphModule) -> dict[str, int]:
    """Bytes of activations alive while each node runs, from tensor lifetimes in the graph.

    Each storage is made by one node and lives until the last user of it or of any view
    or in-place result on it has run; the model's inputs live from the start, its
    outputs until the end. ``max(live_bytes(gm).values())`` is the peak.
    """
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    storage: dict[fx.Node, fx.Node] = {}  # node -> the node whose memory it uses
    for node in nodes:
        source = _aliased_input(node, gm)
        storage[node] = storage[source] if source is not None else node
    last_use = {}
    for node in nodes:
        end = max((order[user] for user in node.users), default=order[node])
        owner = storage[node]
        last_use[owner] = max(last_use.get(owner, 0), end)
    change = [0] * (len(nodes) + 1)
    for owner, end in last_use.items():
        if owner.op in ("output", "get_attr"):
            continue
        size = _bytes(owner.meta.get("tensor_meta"))
        start = 0 if owner.op == "placeholder" else order[owner]
        change[start] += size
        change[end + 1] -= size
    live, alive = {}, 0
    for node, delta in zip(nodes, change):
        alive += delta
        live[node.name] = alive
    return live


def _aliased_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input whose storage ``node`` returns (a view or an in-place op), or None."""
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    if not inputs or node.op in ("placeholder", "output"):
        return None
    op = exact_op(node, gm)
    if op is not None and op.returns == "none":
        return None
    aliases = op is not None and op.returns in ("view", "inplace")  # from the op table
    if node.op == "call_module":  # and from how this module or call was built
        aliases = aliases or getattr(gm.get_submodule(node.target), "inplace", False) is True
    else:
        aliases = aliases or node.kwargs.get("inplace") is True
        aliases = aliases or (node.op == "call_method" and str(node.target).endswith("_"))
    return inputs[0] if aliases else None


def measured_peak(model: nn.Module, inputs: tuple) -> int | None:
    """Peak CUDA memory of one forward pass above what was allocated before it; None off CUDA."""
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with eval_mode(model):
        model(*inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def node_traffic(node: fx.Node, gm: fx.GraphModule) -> int:
    """Bytes one node reads and writes: tensor inputs, tensor outputs, its own weights."""
    if node.op in ("placeholder", "output", "get_attr"):
        return 0
    op = exact_op(node, gm)
    if op is not None and op.returns in ("view", "none"):
        return 0
    moved = _bytes(node.meta.get("tensor_meta"))
    moved += sum(_bytes(arg.meta.get("tensor_meta")) for arg in node.all_input_nodes)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        tensors = list(module.parameters()) + list(module.buffers())
        moved += sum(t.numel() * t.element_size() for t in tensors)
    return moved


def _bytes(meta) -> int:
    """Bytes of a ShapeProp tensor_meta, or of a tuple/list/dict of them."""
    if meta is None:
        return 0
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        numel = 1
        for d in meta.shape:
            numel *= d
        return numel * torch.empty((), dtype=meta.dtype).element_size()
    if isinstance(meta, dict):
        return sum(_bytes(v) for v in meta.values())
    if isinstance(meta, (tuple, list)):
        return sum(_bytes(v) for v in meta)
    return 0
