"""The records that flow down the pipeline: a found Stage, and its StagePlan.

    KINDS                                   # ('residual', 'dense', 'aggregation', 'plain')
    stage = rules.find_stages(traced)[0]    # Stage(name='layer1', kind='residual', base='layer1_0_relu_2', ...)
    plan = plan_stage(traced, stage, config)
    plan.bypass_channels, plan.new_transition, plan.narrowing("layer1_1_conv1")

Both are frozen: a rule finds a Stage, the planner decides everything about its CSP
version once, and the rewrite executes the StagePlan without deciding anything again.
"""

from __future__ import annotations

from dataclasses import dataclass

# The kinds of stage, in the order a user reads them; each is one rule in rules/, registered
# with its description (cspify.rules.DESCRIPTIONS).
KINDS = ("residual", "dense", "aggregation", "plain")


@dataclass(frozen=True)
class Stage:
    """A run of blocks on one stream of feature maps, as a rule found it.

    Names are torch.fx node names of the traced model.

    base:       the node whose output is the stage input x0 (the base layer's output).
    blocks:     the nodes of each block, in graph order; together they are the stage body.
    output:     the last block's output node (what the stage hands on).
    channels:   the stream's width: the size of the base output along ``channel_axis``
                (0 where that axis is not clear).
    channel_axis: the axis of the base output that holds the stream's channels, as the
                layers reading it treat it (``cspify.channels.stream_axis``: never assumed
                to be 1); None where that is not clear, with the sentence why in
                ``axis_problem`` (the planner then leaves the stage as it is).
    inner:      the layers whose output widths are the stage's own width and shrink with
                the through part (by ``1 - gamma``): a plain stage's convs, an aggregation
                stage's layers. A residual or dense stage's width is its base's, so it has none.
    cross_stage: where the stage is already the through part of a cross stage partial
                block (``cspify.rules.cross_stage``), the sentence that says so: the
                planner leaves it unless the stage filter names it.
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
    channel_axis: int | None = 1
    transition: tuple[str, ...] = ()
    axis_problem: str = ""
    inner: tuple[str, ...] = ()
    cross_stage: str = ""

    @property
    def body(self) -> tuple[str, ...]:
        """Every node of the blocks, in order."""
        return tuple(n for block in self.blocks for n in block)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the body, blocks first, then the transition."""
        return self.body + self.transition


@dataclass(frozen=True)
class Narrowing:
    """Which input and output channels the layer (or parameter) of ``node`` keeps
    (``None``: all of them).

    For a parameter reached through ``get_attr``, ``out_keep`` applies along ``axis``.
    """

    node: str
    in_keep: tuple[int, ...] | None
    out_keep: tuple[int, ...] | None
    axis: int | None = None


@dataclass(frozen=True)
class StagePlan:
    """Every decision about one stage's CSP version; the rewrite executes it as it is.

    ``converted`` is False (with a ``reason``) for a stage that is found but left alone;
    the other fields then keep their defaults.

    gamma, fusion:           the options it was planned with ("last": partial transition,
                             then concat; "first": concat, then transition).
    bypass_channels:         the first channels of the base output, which skip the stage.
    through_channels:        the last channels, which run through the partial stage.
    partial_stage:           the nodes that read the through part instead of the base
                             (the blocks, and for fusion last the stage's own transition).
    through_output:          the node whose output is the through part's result; its users
                             read the fused output instead.
    through_output_channels: that node's width after narrowing.
    output_channels:         the stage's output width (the fused output keeps it).
    new_transition:          (in, out) channels of the 1x1 conv the rewrite adds as the
                             partial transition (fusion last: before the concat; fusion
                             first: after it), or None where the stage's own serves.
    norm_template,           the norm and activation nodes whose layers the new transition
    act_template:            copies after its conv (None: no such layer).
    narrowings:              the layers and parameters to narrow, with what each keeps.
    args:                    the literal sizes narrowing changes, ((node, argument), new
                             value) pairs: a channel slice's index, a split's sizes.
    notes:                   what a user should know about the plan (roundings, cost, the
                             literal sizes changed).
    through_index:           the base channels the through part takes where they are not
                             its last ``through_channels`` (a split of the stream that needs
                             some of every part, or the split by importance); the bypass
                             takes the others, in order.
    output_index:            where the output's channels are the base's (a residual stream,
                             fusion last), the output positions of the partial transition's
                             channels when they are not the last ones: the through ones, so
                             that every channel keeps its place (the bypass ones theirs).
    """

    stage: Stage
    converted: bool
    reason: str = ""
    gamma: float = 0.5
    fusion: str = "last"
    bypass_channels: int = 0
    through_channels: int = 0
    partial_stage: tuple[str, ...] = ()
    through_output: str = ""
    through_output_channels: int = 0
    output_channels: int = 0
    new_transition: tuple[int, int] | None = None
    norm_template: str | None = None
    act_template: str | None = None
    narrowings: tuple[Narrowing, ...] = ()
    args: tuple[tuple[tuple[str, int | str], object], ...] = ()
    notes: tuple[str, ...] = ()
    through_index: tuple[int, ...] | None = None
    output_index: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.stage.name

    def narrowing(self, node: str) -> Narrowing | None:
        """What the layer or parameter of ``node`` keeps, or None where it stays whole."""
        return next((n for n in self.narrowings if n.node == node), None)
