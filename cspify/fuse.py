"""Norms folded into the convs before them, for inference: one conv where there were two layers.

    fast = cspify.fuse_for_inference(csp.eval(), x)   # a copy; csp itself is not touched
    folded = fold_norms(csp.eval(), x)                # the same, with what was done
    folded.model, folded.norms, folded.max_abs_diff, folded.tolerance

The folding is torch's own (``torch.fx.experimental.optimization.fuse``: a Conv1d/2d/3d
or Linear followed by a BatchNorm of the same dimension whose running statistics it
tracks, where nothing else reads the conv's output). It is applied to the GraphModules in
the model (a converted model is one; a ``scope`` conversion holds one at its scope), in
place on a copy, so the copy keeps its class, its conversion record
(``cspify.record.conversion_of``) and a host framework's attributes. A model without a
GraphModule (an original model, to time both alike) is traced by cspify first.

The folded model is checked against the unfused one on the example inputs: the largest
absolute difference of any output must stay within ``RTOL`` of the largest output
magnitude, or the folding is refused with both numbers. Folding uses the norms' running
statistics, which only a model in eval mode uses: a model in training mode is refused.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.optimization import fuse as _torch_fuse
from torch.utils._pytree import tree_flatten

from cspify.errors import CspifyError, TraceError
from cspify.trace import as_inputs, ready_to_trace, symbolic_trace

RTOL = 1e-4  # largest |fused - unfused| allowed, relative to the largest |unfused output|
ATOL = 1e-7  # where every output is zero


@dataclass(frozen=True)
class Folded:
    """A model with its norms folded, and what was checked."""

    model: nn.Module
    norms: tuple[tuple[str, str], ...]  # (norm, conv or linear it was folded into), module paths
    max_abs_diff: float                 # largest |fused - unfused| over every output on the example inputs
    tolerance: float                    # the most that was allowed

    def summary(self) -> str:
        return (f"folded {len(self.norms)} norm(s) into the convs before them (largest difference on the example "
                f"inputs {self.max_abs_diff:.3g}, allowed {self.tolerance:.3g})")


def fuse_for_inference(model: nn.Module, example_inputs, *, leaf_modules=()) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every norm that follows a conv or linear
    folded into it, checked against ``model`` on ``example_inputs``; see ``fold_norms``."""
    return fold_norms(model, example_inputs, leaf_modules=leaf_modules).model


def fold_norms(model: nn.Module, example_inputs, *, leaf_modules=()) -> Folded:
    """Fold norms into the convs before them on a copy of ``model``, check the copy
    against ``model`` on ``example_inputs``, and say what was folded.

    ``leaf_modules`` matters only for a model that is not a GraphModule and holds none:
    the submodules to keep whole when cspify traces it."""
    _refuse_training(model)
    inputs = as_inputs(example_inputs)
    expected = _outputs(model, inputs, "the model")
    fused = copy.deepcopy(model)
    parts = _graph_modules(fused)
    if not parts:  # an original model: cspify traces it (a copy) first
        fused = symbolic_trace(ready_to_trace(model, inputs), leaf_modules, inputs)
        fused.eval()
        parts = [("", fused)]
    norms = tuple((f"{prefix}{norm}", f"{prefix}{conv}") for path, gm in parts
                  for prefix in [f"{path}." if path else ""] for norm, conv in _fold(gm))
    got = _outputs(fused, inputs, "the folded model")
    diff, tolerance = _difference(expected, got)
    if not diff <= tolerance:
        raise CspifyError(
            f"folding {len(norms)} norm(s) changed the outputs by up to {diff:.3g} on the example inputs, more than "
            f"the {tolerance:.3g} allowed ({RTOL:g} of the largest output, {_largest(expected):.3g}).",
            "keep the unfused model; please report the model, as folding should not change its outputs",
        )
    return Folded(fused, norms, diff, tolerance)


def _refuse_training(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise CspifyError(
            f"the model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}), and "
            "folding norms uses their running statistics, which only eval mode uses.",
            "call model.eval() first: a folded model is for inference only",
        )


def _graph_modules(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """The outermost GraphModules in ``model`` (the model itself where it is one), by path."""
    found: list[tuple[str, fx.GraphModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule) and not any(name.startswith(f"{p}.") or p == "" for p, _ in found):
            found.append((name, module))
    return found


def _fold(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Fold ``gm``'s norms into its convs in place; the (norm, layer) module paths folded."""
    calls = {n.name: n for n in gm.graph.nodes if n.op == "call_module"}
    folded = _torch_fuse(gm, inplace=True, no_trace=True)  # replaces the convs in gm; returns a new GraphModule
    kept = {n.name for n in folded.graph.nodes}
    pairs = [(node.target, node.args[0].target) for name, node in calls.items() if name not in kept]
    if pairs:
        gm.graph = folded.graph  # gm keeps its class, meta (the conversion record) and attributes
        gm.delete_all_unused_submodules()
        gm.recompile()
    return pairs


def _outputs(model: nn.Module, inputs: tuple, what: str) -> list:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:
        raise TraceError(
            f"{what} does not run on the example inputs ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}).",
            "give inputs the model takes (--input-shape, or example_inputs() in the model file)",
        ) from exc
    return tree_flatten(out)[0]


def _largest(outputs: list) -> float:
    return max((o.detach().abs().max().item() for o in outputs
                if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel()), default=0.0)


def _difference(expected: list, got: list) -> tuple[float, float]:
    """(largest |got - expected| over every output, the tolerance); inf where the outputs
    differ in number, kind or shape."""
    tolerance = RTOL * _largest(expected) or ATOL
    if len(expected) != len(got):
        return float("inf"), tolerance
    diff = 0.0
    for a, b in zip(expected, got):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return float("inf"), tolerance
        if not isinstance(a, torch.Tensor):
            if a != b:
                return float("inf"), tolerance
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf"), tolerance
        if a.numel():
            delta = (a.double() - b.double()).abs().max().item()
            if math.isnan(delta):  # NaN where the unfused model gave NaN too: compare where it did not
                same_nan = torch.equal(a.isnan(), b.isnan())
                delta = (a.double() - b.double()).nan_to_num(0.0).abs().max().item() if same_nan else float("inf")
            diff = max(diff, delta)
    return diff, tolerance
