"""The three verbs, each a short walk down the pipeline:

    trace ─▶ find ─▶ plan ─▶ rewrite          convert(model, inputs, gamma=0.5)
    trace ─▶ find                             find_stages(model, inputs)
    measure x2 ─▶ report                      compare(model, converted, inputs)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from cspify import rules
from cspify.config import CSPConfig
from cspify.errors import ConfigError, CspifyError, NoStageError
from cspify.measure import measure
from cspify.plan import plan_stage
from cspify.report import Report, build_report
from cspify.rewrite import rewrite
from cspify.stage import Stage, StagePlan
from cspify.trace import as_inputs, propagate_shapes, shape, trace

META_KEY = "cspify"


def find_stages(model: nn.Module, example_inputs, *, leaf_modules: Iterable[str] = ()) -> list[Stage]:
    """The residual and dense stages of ``model``, found by graph structure; nothing changes."""
    return rules.find_stages(trace(model, example_inputs, leaf_modules))


def convert(
    model: nn.Module,
    example_inputs,
    gamma: float = 0.5,
    *,
    fusion: str = "last",
    hidden: str = "keep",
    stages: Iterable[str] | None = None,
    allow_costlier: bool = False,
    leaf_modules: Iterable[str] = (),
    seed: int = 0,
    config: CSPConfig | None = None,
) -> fx.GraphModule:
    """The CSP version of ``model`` as a new GraphModule; ``model`` itself is not touched.

    Every stage found is converted unless ``stages`` names a subset, or its conversion
    would cost more multiply-adds than it saves (``allow_costlier=True`` converts those too). Outputs keep their
    shapes and dtypes. ``gm.meta["cspify"]`` records what was done, for ``compare``.
    """
    if config is None:
        config = CSPConfig(gamma, fusion, hidden, tuple(stages) if stages is not None else None, allow_costlier)
    inputs = as_inputs(example_inputs)
    traced = trace(model, inputs, leaf_modules)
    found = rules.find_stages(traced)
    if not found:
        raise NoStageError(
            f"{type(model).__name__} has no residual or dense stage.",
            "cspify converts chains of x + f(x) blocks and DenseNet-style concat chains; "
            "run `cspify analyze` to see what it finds",
        )
    _check_filter(config, found)
    plans = [plan_stage(traced, stage, config) for stage in found]
    if not any(plan.converted for plan in plans):
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in plans)
        raise NoStageError(
            f"none of the {len(plans)} stages found in {type(model).__name__} can be converted ({reasons}).",
            "try another gamma, or allow_costlier (--allow-costlier) where a stage costs more than it saves",
        )
    expected = _output_shapes(traced.gm)
    gm, added = rewrite(traced, plans, seed=seed)
    gm.meta[META_KEY] = _metadata(config, plans, added)
    propagate_shapes(gm, inputs)
    if _output_shapes(gm) != expected:  # a bug of ours, never the user's
        raise CspifyError(
            "the converted model's outputs changed shape, which is a bug in cspify.",
            "please report it with the model; convert fewer stages with --stage meanwhile",
        )
    return gm


def compare(original: nn.Module, converted: nn.Module, example_inputs, *, leaf_modules: Iterable[str] = ()) -> Report:
    """Measure both models and report totals and per-stage savings."""
    inputs = as_inputs(example_inputs)
    before = measure(original, inputs, leaf_modules)
    after = measure(converted, inputs, leaf_modules)
    meta = getattr(converted, "meta", {}).get(META_KEY)
    return build_report(before, after, meta)


def _check_filter(config: CSPConfig, found: list[Stage]) -> None:
    if config.stages is None:
        return
    names = [stage.name for stage in found]
    unknown = [s for s in config.stages if s not in names]
    if unknown:
        raise ConfigError(
            f"no stage is named {', '.join(repr(s) for s in unknown)}.",
            f"the stages found are: {', '.join(names)}",
        )


def _output_shapes(gm: fx.GraphModule) -> list:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [(shape(n), n.meta.get("tensor_meta").dtype if shape(n) else None) for n in output.all_input_nodes]


def _metadata(config: CSPConfig, plans: list[StagePlan], added: dict[str, tuple[str, ...]]) -> dict:
    """What compare needs to know about a conversion: plain, picklable data."""
    return {
        "options": {"gamma": config.gamma, "fusion": config.fusion, "hidden": config.hidden},
        "stages": [
            {
                "name": p.name,
                "kind": p.stage.kind,
                "channels": p.stage.channels,
                "bypass_channels": p.bypass_channels,
                "through_channels": p.through_channels,
                "converted": p.converted,
                "reason": p.reason,
                "notes": list(p.notes),
                "nodes": list(p.stage.nodes),
                "added": list(added.get(p.name, ())),
            }
            for p in plans
        ],
    }
