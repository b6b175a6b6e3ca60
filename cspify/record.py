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

RECORD_KEY = "cspify"  # where convert leaves the record: GraphModule.meta[RECORD_KEY]


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
    time_before_ms: float | None = None  # with objective latency: the whole model's median ms on the target
    time_after_ms: float | None = None   # device without this stage and with it (the other chosen stages converted)
    through_index: tuple[int, ...] | None = None  # the base channels of the through part, where not the last ones


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
        if self.objective != "flops":
            options["objective"] = self.objective
        options.update((f"target_{what}", value) for what, value in self.targets)
        return options


def conversion_of(model: nn.Module, scope: str | None = None) -> Conversion | None:
    """The record ``convert`` left on ``model`` (or on its submodule at ``scope``), else None."""
    part = model.get_submodule(scope) if scope else model
    record = getattr(part, "meta", {}).get(RECORD_KEY)
    return record if isinstance(record, Conversion) else None


def attach(gm: nn.Module, record: Conversion) -> None:
    """Leave ``record`` on a converted GraphModule."""
    gm.meta[RECORD_KEY] = record
