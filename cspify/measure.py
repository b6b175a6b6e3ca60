"""Measurement of one model: fvcore flops, params and activations, and bytes of memory
traffic per node, kept per module and per node so a report can roll them up per stage.

    m = measure(model, torch.randn(1, 3, 224, 224))
    m.flops, m.params, m.activations, m.memory_bytes     # totals
    m.stage(nodes=["layer1_1_conv1", ...])               # the same figures for some nodes

fvcore counts one fused multiply-add as one flop. Memory traffic is what each op reads
and writes (input and output tensors, its own weights) at the traced dtype; ops that
only make a view (narrow, view, getitem, size) move nothing.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

with warnings.catch_warnings():  # fvcore's import still decorates with torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis, parameter_count

from cspify.trace import as_inputs, eval_mode, trace

FLOP_NOTE = "fvcore counts one fused multiply-add as one flop"

# Ops that return a view of their input: they read and write no memory.
VIEW_OPS = {
    torch.narrow, operator.getitem, getattr, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.permute, torch.transpose, torch.reshape,
    "narrow", "view", "view_as", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
    "reshape", "expand", "expand_as", "size", "dim", "contiguous",
    nn.Identity, nn.Flatten, nn.Unflatten,
}


@dataclass
class Figures:
    """The four numbers a report compares."""

    flops: int = 0
    params: int = 0
    activations: int = 0
    memory_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in vars(self).items()}


@dataclass
class Measurement:
    """Totals plus what a per-stage roll-up needs: figures per module and per node."""

    totals: Figures
    module_flops: dict[str, int]
    module_activations: dict[str, int]
    module_params: dict[str, int]
    node_bytes: dict[str, int]
    node_targets: dict[str, str]

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
        )


def measure(model: nn.Module, example_inputs, leaf_modules: Iterable[str] = ()) -> Measurement:
    """Measure a model (never modified: everything runs on a traced deep copy, eval mode)."""
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, leaf_modules).gm
    with eval_mode(gm):
        flops = FlopCountAnalysis(gm, inputs)
        activations = ActivationCountAnalysis(gm, inputs)
        for analysis in (flops, activations):
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        module_flops, module_acts = flops.by_module(), activations.by_module()
    params = parameter_count(gm)
    node_bytes = {node.name: node_traffic(node, gm) for node in gm.graph.nodes}
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
    totals = Figures(module_flops[""], params[""], module_acts[""], sum(node_bytes.values()))
    return Measurement(totals, dict(module_flops), dict(module_acts), dict(params), node_bytes, targets)


def node_traffic(node: fx.Node, gm: fx.GraphModule) -> int:
    """Bytes one node reads and writes: tensor inputs, tensor outputs, its own weights."""
    if node.op in ("placeholder", "output", "get_attr"):
        return 0
    target = type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target
    try:
        if target in VIEW_OPS:
            return 0
    except TypeError:  # unhashable target
        pass
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
