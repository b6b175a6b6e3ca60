"""Measurement of one model: fvcore flops, params and activations, and bytes of memory
traffic per node, kept per module and per node so a report can roll them up per stage.

    m = measure(model, torch.randn(1, 3, 224, 224))
    m.totals.flops, m.totals.params, m.totals.activations, m.totals.memory_bytes   # totals
    m.totals.cio_bytes, m.totals.peak_bytes              # HarDNet's CIO, estimated peak
    m.totals.max_layer_flops, m.totals.layer_balance     # the computational bottleneck
    m.stage(["layer1_1_conv1", "layer1_1_bn1"])          # the same figures for some nodes

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
from collections.abc import Iterable
from dataclasses import dataclass, field
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


@dataclass
class Figures:
    """The numbers a report compares: counts are integers, ``layer_balance`` a ratio,
    ``measured_peak_bytes`` ``None`` where it was not measured (CPU, a stage)."""

    flops: int = 0
    params: int = 0
    activations: int = 0
    memory_bytes: int = 0
    cio_bytes: int = 0
    peak_bytes: int = 0
    max_layer_flops: int = 0
    layer_balance: float = 0.0
    measured_peak_bytes: int | None = None

    def to_dict(self) -> dict:
        def plain(value):
            if value is None:
                return None
            return round(float(value), 3) if isinstance(value, float) else int(value)

        return {k: plain(v) for k, v in vars(self).items()}


@dataclass
class Measurement:
    """Totals plus what a per-stage roll-up needs: figures per module and per node."""

    totals: Figures
    module_flops: dict[str, int]
    module_activations: dict[str, int]
    module_params: dict[str, int]
    node_bytes: dict[str, int]
    node_targets: dict[str, str]
    node_cio: dict[str, int] = field(default_factory=dict)
    node_live: dict[str, int] = field(default_factory=dict)
    layer_flops: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return self.totals.flops

    def stage(self, nodes: Iterable[str]) -> Figures:
        """Figures of a set of nodes: module figures of the modules they call, their bytes."""
        nodes = [n for n in nodes if n in self.node_bytes]
        modules = {self.node_targets[n] for n in nodes if n in self.node_targets}
        return Figures(
            flops=sum(self.module_flops.get(m, 0) for m in modules),
            params=sum(self.module_params.get(m, 0) for m in modules),
            activations=sum(self.module_activations.get(m, 0) for m in modules),
            memory_bytes=sum(self.node_bytes[n] for n in nodes),
            cio_bytes=sum(self.node_cio.get(n, 0) for n in nodes),
            peak_bytes=max((self.node_live.get(n, 0) for n in nodes), default=0),
            **bottleneck([self.layer_flops[m] for m in modules if m in self.layer_flops]),
        )


def measure(model: nn.Module, example_inputs, leaf_modules: Iterable[str] = ()) -> Measurement:
    """Measure a model (never modified: everything runs on a traced deep copy, eval mode)."""
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, leaf_modules).gm
    with eval_mode(gm):
        module_flops, module_acts = fvcore_counts(gm, inputs)
    params = parameter_count(gm)
    node_bytes = {node.name: node_traffic(node, gm) for node in gm.graph.nodes}
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
    node_cio = {node.name: conv_io(node, gm) for node in gm.graph.nodes}
    node_live = live_bytes(gm)
    layers = {name: module_flops.get(name, 0) for name, m in gm.named_modules() if isinstance(m, LAYER_TYPES)}
    totals = Figures(
        module_flops[""], params[""], module_acts[""], sum(node_bytes.values()),
        cio_bytes=sum(node_cio.values()), peak_bytes=max(node_live.values(), default=0),
        measured_peak_bytes=measured_peak(gm, inputs), **bottleneck(list(layers.values())),
    )
    return Measurement(
        totals, dict(module_flops), dict(module_acts), dict(params), node_bytes, targets, node_cio, node_live, layers
    )


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


def bottleneck(layer_flops: list[int]) -> dict:
    """The largest single-layer flops and how uneven the load is (largest / mean)."""
    layer_flops = [f for f in layer_flops if f > 0]
    if not layer_flops:
        return {"max_layer_flops": 0, "layer_balance": 0.0}
    largest = max(layer_flops)
    return {"max_layer_flops": largest, "layer_balance": largest * len(layer_flops) / sum(layer_flops)}


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
