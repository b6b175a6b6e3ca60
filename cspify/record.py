"""What a conversion did, as one typed record: ``convert`` writes it, the report, the
sweep, calibration and fine-tuning read it.

    csp = cspify.convert(model, x)
    record = conversion_of(csp)             # a Conversion, or None for a model cspify did not make
    record.config.gamma                     # the options it ran with
    [s.name for s in record.converted]      # the stages it rewrote
    s.output, s.converted_output            # the node handing the stage on, before and after

Node names are torch.fx node names: ``nodes`` and ``output`` name nodes of the original
model traced by cspify (with the same leaf modules), ``added`` and ``converted_output``
nodes of the converted GraphModule. With a ``scope``, both graphs are those of the
submodule at that path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from cspify.config import CSPConfig
from cspify.errors import ConfigError
from cspify.pyramid import Fusion
from cspify.stage import Narrowing

# Where each step leaves its record: GraphModule.meta[KEY] of the converted GraphModule (the
# scoped submodule with a scope). This module owns the keys and the lookup; no other reads meta.
RECORD_KEY = "cspify"                # the Conversion, left by convert
CALIBRATE_KEY = "cspify.calibrate"   # the Calibration, left by calibrate
FINETUNE_KEY = "cspify.finetune"     # the FinetuneRun, left by finetune
INPUTS_KEY = "cspify.inputs"         # {"mean": [...], "std": [...]}: the input normalisation it was fitted on


@dataclass(frozen=True)
class StageRecord:
    """One stage found: what became of it and where it lives in both graphs."""

    name: str
    kind: str
    channels: int
    converted: bool
    reason: str = ""
    bypass_channels: int = 0
    through_channels: int = 0
    base: str = ""
    blocks: int = 0
    nodes: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    output: str = ""
    converted_output: str = ""
    notes: tuple[str, ...] = ()
    gamma: float | None = None          # the options this stage was planned with (CSPConfig.for_stage)
    hidden: str = ""
    fusion: str = ""                    # how its parts join: "last", or "first" where planning chose it for the stage
    time_before_ms: float | None = None  # with objective latency: the whole model's median ms on the target
    time_after_ms: float | None = None   # device without this stage and with it (the other chosen stages converted)
    through_index: tuple[int, ...] | None = None  # the base channels of the through part, where not the last ones
    output_index: tuple[int, ...] | None = None   # the output positions of the partial transition's channels, where
                                                  # not after the bypass (StagePlan.output_index)
    narrowings: tuple[Narrowing, ...] = ()  # which channels each narrowed layer keeps (nodes of the original)

    def narrowing(self, node: str) -> Narrowing | None:
        """What the conversion narrowed the layer at node ``node`` to (None: nothing)."""
        return next((n for n in self.narrowings if n.node == node), None)


@dataclass(frozen=True)
class Conversion:
    """A whole conversion: its options, where it ran, and a record per stage found."""

    config: CSPConfig
    stages: tuple[StageRecord, ...]
    seed: int = 0
    scope: str | None = None
    leaf_modules: tuple[str, ...] = ()
    kept_whole: tuple[tuple[str, str], ...] = ()  # (module, why): leaves tracing chose itself
    objective: str = "flops"                      # what chose the stages and their options (cspify.budget)
    targets: tuple[tuple[str, float], ...] = ()   # (("flops", 0.7),): the budget asked for
    notes: tuple[str, ...] = ()                   # what the choice measured and chose, one sentence each
    images: int = 0                               # the images the split by importance measured (0: none)
    parts: tuple[str, ...] = ()                   # submodules of kept-whole modules converted on their own
                                                  # (each a GraphModule with its own record)
    fusions: tuple[Fusion, ...] = ()              # pyramid concats compressed by Maxout (cspify.pyramid)

    @property
    def converted(self) -> tuple[StageRecord, ...]:
        return tuple(stage for stage in self.stages if stage.converted)

    def summary(self) -> dict:
        """The options a report's title shows ("per stage" where stages have their own)."""
        config = self.config
        options = {"gamma": "per stage" if config.stage_gammas else config.gamma, "fusion": config.fusion,
                   "hidden": "per stage" if config.stage_hidden else config.hidden}
        if config.round_to > 1:
            options["round_to"] = config.round_to
        if self.images:
            options["split"] = f"importance ({self.images} images)"
        if self.objective != "flops":
            options["objective"] = self.objective
        options.update((f"target_{what}", value) for what, value in self.targets)
        return options


def conversion_of(model: nn.Module, scope: str | None = None) -> Conversion | None:
    """The record ``convert`` left on ``model`` (or on its submodule at ``scope``), else None."""
    part = model.get_submodule(scope) if scope else model
    record = getattr(part, "meta", {}).get(RECORD_KEY)
    return record if isinstance(record, Conversion) else None


def find_conversion(model: nn.Module) -> tuple[str | None, Conversion]:
    """Where in ``model`` cspify's conversion record is: (scope or None, record); a model
    cspify did not make is an error."""
    for name, module in model.named_modules():
        record = conversion_of(module)
        if record is not None:
            return name or None, record
    raise ConfigError(
        f"{type(model).__name__} was not made by cspify.convert, so there is no conversion to calibrate or distil.",
        "pass the model cspify.convert returned (a torch.fx GraphModule that carries its conversion record)",
    )


def find_conversions(model: nn.Module) -> list[tuple[str | None, Conversion]]:
    """Every conversion record in ``model``, outermost first: (path or None, record). Beside
    the conversion itself, the parts of modules that tracing kept whole, each converted on
    its own (``Conversion.parts``). A model cspify did not make is an error."""
    found = [(name or None, record) for name, module in model.named_modules()
             if (record := conversion_of(module)) is not None]
    if not found:
        find_conversion(model)  # raises the error
    return found


def attach(gm: nn.Module, record: Conversion) -> None:
    """Leave ``record`` on a converted GraphModule."""
    gm.meta[RECORD_KEY] = record


def step_record(model: nn.Module, key: str):
    """What a step (``CALIBRATE_KEY``, ``FINETUNE_KEY``) left on ``model``, else None: on the
    module that carries the conversion record (the scoped submodule with a scope), or on the
    model itself where cspify did not make it."""
    return getattr(_holder(model), "meta", {}).get(key)


def leave_step_record(model: nn.Module, key: str, value) -> None:
    """Leave a step's record on ``model``, where ``step_record`` reads it."""
    holder = _holder(model)
    if not isinstance(getattr(holder, "meta", None), dict):
        holder.meta = {}
    holder.meta[key] = value


def _holder(model: nn.Module) -> nn.Module:
    return next((m for _, m in model.named_modules() if conversion_of(m) is not None), model)
