"""The records that flow down the pipeline: a found Stage, and its StagePlan."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """A run of blocks on one stream of feature maps, as a rule found it.

    Names are torch.fx node names of the traced model.

    base:       the node whose output is the stage input x0 (the base layer's output).
    blocks:     the nodes of each block, in graph order; together they are the stage body.
    output:     the last block's output node (what the stage hands on).
    transition: for a dense stage, the existing transition layer after it (norm, act,
                1x1 conv, ...) that fusion last turns into the partial transition; the
                concat then goes after its last node. Empty when there is none.
    """

    name: str
    kind: str
    base: str
    blocks: tuple[tuple[str, ...], ...]
    output: str
    channels: int
    channel_axis: int = 1
    transition: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the body, blocks first, then the transition."""
        body = tuple(n for block in self.blocks for n in block)
        return body + self.transition


@dataclass(frozen=True)
class Narrowing:
    """Which input and output channels a layer keeps (``None``: all of them).

    For a parameter reached through ``get_attr``, ``out_keep`` applies along ``axis``.
    """

    in_keep: tuple[int, ...] | None
    out_keep: tuple[int, ...] | None
    axis: int | None = None


@dataclass
class StagePlan:
    """What the rewriter does to one stage: widths after rounding, layers to narrow.

    ``converted`` is False (with a ``reason``) for a stage that is found but left alone.
    """

    stage: Stage
    converted: bool
    reason: str = ""
    gamma: float = 0.5
    fusion: str = "last"
    bypass_channels: int = 0
    through_channels: int = 0
    narrowings: dict[str, Narrowing] = field(default_factory=dict)
    through_output_channels: int = 0
    output_channels: int = 0
    norm_template: str | None = None
    act_template: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.stage.name
