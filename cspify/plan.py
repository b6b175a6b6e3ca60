"""From a found Stage and the options to a StagePlan: every decision about the stage's CSP
version, made once. The rewrite only executes it.

    plan = plan_stage(traced, stage, config)
    plan.bypass_channels, plan.through_channels   # 128, 128 for resnet50's layer1
    plan.new_transition                           # (128, 128): the 1x1 conv the rewrite adds
    plan.narrowing("layer1_1_conv1")              # Narrowing('layer1_1_conv1', in_keep=(128, ..., 255), ...)

Planning goes in small steps: the widths (the split of the base, rounded to the groups its
layers need), what every channel space keeps, the narrowings that follow, the partial
transition, and the cost check (is the converted stage cheaper?). A step that finds the
stage cannot be converted raises ``_Skip`` with the reason the report shows.

Widths are rounded by one rule, half up: the bypass takes ``floor(gamma * C + 0.5)`` of
the stream's C channels (7 channels at gamma 0.5: a bypass of 4; 13: a bypass of 7), and
with ``hidden="scale"`` an inner width W becomes ``floor((1 - gamma) * W + 0.5)``
(``half_up``). Where the stream's layers need a multiple of their groups, or
``round_to`` asks for one, the through part ``C - bypass`` then goes to the nearest such
multiple, the smaller one on a tie (so the bypass gets the extra channels, as the half-up
rule gives them), with a note; scaled inner widths the same way.

The through part is the *last* ``C - bypass`` channels of the base output, along the axis
the stream's layers read as channels (``Stage.channel_axis``), so narrowed layers keep the
weights of exactly the channels they still see. With ``split="importance"`` and scores
measured on images (``cspify.importance``) it is the ``C - bypass`` channels of highest
score instead (``StagePlan.through_index``), the narrowed layers keeping those.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import torch.fx as fx
import torch.nn as nn

from cspify.channels import Analysis, EmptyPart, Keeps, NarrowingError, analyse, derive_keeps
from cspify.config import CSPConfig
from cspify.graph import shape
from cspify.importance import through_of
from cspify.narrow import can_mix, layer_width, reparametrization_problem
from cspify.ops import channel_dim, role_of, rule_for
from cspify.stage import Narrowing, Stage, StagePlan
from cspify.trace import Traced


def half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up: the one rounding rule for widths
    (``round`` would round halves to even: a bypass of 6 for 13 channels at gamma 0.5).
    Rounded to 9 places first so that 0.55 * 10 (5.500000000000001) counts as a half."""
    return math.floor(round(x, 9) + 0.5)


def round_to(width: float, multiple: int, low: int, high: int) -> int:
    """The multiple of ``multiple`` nearest to ``width`` within [low, high] (0 if none)."""
    candidates = [m for m in range(multiple, high + 1, multiple) if m >= low]
    return min(candidates, key=lambda m: (abs(m - width), m)) if candidates else 0


def per_block_keep(width: int, keep: int, blocks: int) -> tuple[int, ...]:
    """Keep the first ``keep / blocks`` channels of each of ``blocks`` equal groups."""
    size, per = width // blocks, keep // blocks
    return tuple(b * size + i for b in range(blocks) for i in range(per))


NOT_SELECTED = "not selected by the stage filter"  # the reason of a stage the filter leaves


def plan_stage(traced: Traced, stage: Stage, config: CSPConfig, scores=None) -> StagePlan:
    """Decide every width of one stage's CSP version, with the options ``config`` gives this
    stage (``CSPConfig.for_stage``); unconvertible stages say why (with the notes planning
    made before it found the reason).

    ``scores`` (one per base channel, ``cspify.importance.measure``) choose the channels that
    run through where ``config.split`` is "importance"; without them the last ones do."""
    config = config.for_stage(stage.name)
    notes: list[str] = []
    try:
        if config.stages is not None and stage.name not in config.stages:
            raise _Skip(NOT_SELECTED)
        if stage.cross_stage and config.stages is None:
            raise _Skip(f"{stage.cross_stage}; name it with --stage to nest a second CSP in it")
        if config.split == "importance" and scores is not None:
            try:
                return _plan(traced, stage, config, [], scores)
            except _Skip as skip:
                notes.append(f"the split by importance does not fit it ({skip}): the last channels run through")
        try:
            return _plan(traced, stage, config, notes)
        except _NarrowOutput as narrow:
            if config.fusion != "last" or stage.transition:
                raise
            notes.append(f"fusion first: its output ({narrow.output} channels) is not wider than its bypass "
                         f"({narrow.bypass}), so the parts are joined before a new transition to its width")
            return _plan(traced, stage, replace(config, fusion="first"), notes)
    except _Skip as skip:
        reason = str(skip) + (_scale_hint(traced, stage, config) if isinstance(skip, _Costlier) else "")
        return StagePlan(
            stage, converted=False, reason=reason, gamma=config.gamma, fusion=config.fusion, notes=tuple(notes)
        )


class _Skip(Exception):
    """Why a stage stays as it is."""


class _NarrowOutput(_Skip):
    """Fusion last cannot join the parts: the output is not wider than the bypass."""

    def __init__(self, output: int, bypass: int) -> None:
        super().__init__(f"its output ({output} channels) is not wider than its bypass ({bypass} channels), "
                         "so no partial transition is left to join it")
        self.output, self.bypass = output, bypass


class _Costlier(_Skip):
    """The stage's conversion would not save multiply-adds."""


class _EmptyPart(_Skip):
    """Narrowing would leave a part of a split no channels (``split``: which)."""

    def __init__(self, error: EmptyPart) -> None:
        super().__init__(str(error))
        self.split = error.split


def _scale_hint(traced: Traced, stage: Stage, config: CSPConfig) -> str:
    """Where a stage (typically a single block) does not pay with its inner widths kept,
    whether narrowing them too (hidden='scale') would make it pay."""
    if config.hidden == "scale":
        return ""
    try:
        _plan(traced, stage, replace(config, hidden="scale"), [])
    except _Skip:
        return ""
    return "; with --hidden scale (its inner widths narrowed too) it pays"


def _narrower_base(traced: Traced, stage: Stage) -> str:
    """Why a stage whose width lives in its own layers (``Stage.inner``: plain, aggregation)
    cannot take a base narrower than they work at, or "": its bypass would carry the base's
    own channels (the colour channels of the model's input image) instead of features at the
    stage's width. A residual or dense stage's width is its base's by definition, and so is
    that of a stage whose output has its base's width (a bottleneck stack, 256 -> 512 -> 256),
    unless the base is the model's input."""
    widths = [dims[stage.channel_axis] for n in stage.inner if (dims := shape(traced.nodes[n])) is not None]
    width = max(widths, default=0)
    base = traced.nodes[stage.base]
    output = shape(traced.nodes[stage.output])
    if stage.channels >= width or (base.op != "placeholder" and output and output[stage.channel_axis] == stage.channels):
        return ""
    where = "the model's input" if base.op == "placeholder" else f"its base '{base.target if base.op == 'call_module' else base.name}'"
    return (f"{where} has {stage.channels} channels, fewer than the {width} its layers work at: "
            "a bypass would carry those channels, not the stage's features")


def _plan(traced: Traced, stage: Stage, config: CSPConfig, notes: list[str], scores=None) -> StagePlan:
    """The plan of a stage the filter selected; adds to ``notes`` as it goes. With
    ``scores``, the through part is the channels of highest score (``importance.through_of``)."""
    if stage.channel_axis is None:
        raise _Skip(stage.axis_problem)
    narrower = _narrower_base(traced, stage)
    if narrower:
        raise _Skip(narrower)
    fusion_last = config.fusion == "last"
    partial = stage.nodes if fusion_last else stage.body  # fusion first keeps the stage's transition after the concat
    through_output = stage.transition[-1] if fusion_last and stage.transition else stage.output
    a = analyse(traced, partial, stage.base, stage.channel_axis)

    bypass, through = _split(a, stage, config, notes)
    stream = a.spaces.find(a.info[stage.base].space)
    last = tuple(range(bypass, stage.channels))  # the last channels, unless a split needs them spread
    through_index = through_of(scores, through) if scores is not None else last
    while True:
        keeps = {stream: through_index}
        if fusion_last and stage.transition:
            keeps.update(_transition_keep(a, stage, bypass))
        scaled = _scale_inner(a, stage.inner, config, keeps)  # the stage's own widths
        if config.hidden == "scale":
            scaled += _scale_inner(a, partial, config, keeps)
        resolve = _Resolver(a, keeps)
        try:
            narrowings = _narrowings(a, partial, resolve)
            break
        except _EmptyPart as empty:
            spread = _spread(a, stream, empty.split, through) if not stage.transition and scores is None else None
            if spread is None or spread == through_index:
                raise
            through_index, spread_over = spread, empty.split.node
    notes += scaled + resolve.moved
    if scores is not None:
        notes.append(f"the through part is the {through} of {stage.channels} channels it works on most, "
                     "measured on the images (split by importance)")
    elif through_index != last:
        notes.append(f"the through part takes the last channels of each part of '{spread_over}' "
                     f"({through} of {stage.channels}), so that every part keeps some")
    _check_single_use(traced, narrowings)

    output_channels = shape(traced.nodes[through_output])[stage.channel_axis]
    out_keep = resolve(a.info[through_output].space)
    through_output_channels = len(out_keep) if out_keep is not None else output_channels
    new_transition = _new_transition(stage, config.fusion, bypass, through_output_channels, output_channels)
    if new_transition and new_transition[1] < 1:
        raise _NarrowOutput(output_channels, bypass)
    rank = len(shape(traced.nodes[through_output]))
    if new_transition and not can_mix(rank, stage.channel_axis):
        raise _Skip(
            f"its channels are on axis {stage.channel_axis} of the {rank}-dim '{through_output}', where neither "
            "a 1x1 conv nor a linear layer can be its partial transition"
        )
    norm_template, act_template = _templates(a, partial, stage)
    norm = traced.gm.get_submodule(traced.nodes[norm_template].target) if norm_template else None
    notes.extend(_group_norm_note(norm, new_transition))
    before, after = _cost(traced, partial, narrowings)
    after += _transition_cost(new_transition, traced.nodes[through_output], stage.channel_axis, norm)
    notes.extend(_cost_note(before, after, config.allow_costlier))
    # Where the output's channels are the base's (a residual stream), each keeps its place:
    # the bypass channels where they were, the partial transition's at the through ones.
    in_place = fusion_last and not stage.transition and a.spaces.find(a.info[through_output].space) == stream
    return StagePlan(
        stage, converted=True, gamma=config.gamma, fusion=config.fusion,
        bypass_channels=bypass, through_channels=through,
        partial_stage=tuple(partial), through_output=through_output,
        through_output_channels=through_output_channels, output_channels=output_channels,
        new_transition=new_transition, norm_template=norm_template, act_template=act_template,
        narrowings=tuple(narrowings.values()), args=tuple(resolve.args.items()), notes=tuple(notes),
        through_index=None if through_index == last else through_index,
        output_index=through_index if in_place and through_index != last else None,
    )


def _spread(a: Analysis, stream: int, split, through: int) -> tuple[int, ...] | None:
    """Where a split of the stream would leave a part no channels with the last channels
    as the through part: the through part taken from every part instead, the last channels
    of each, in proportion to its width (largest remainders). None where the split is not
    the stream's own or a part would still be empty."""
    if a.spaces.find(split.source) != stream:
        return None
    widths = [a.spaces[p].width for p in split.pieces]
    total = sum(widths)
    shares = [w * through / total for w in widths]
    counts = [int(x) for x in shares]
    for i in sorted(range(len(widths)), key=lambda i: counts[i] - shares[i])[: through - sum(counts)]:
        counts[i] += 1
    if 0 in counts:
        return None
    index, offset = [], 0
    for width, count in zip(widths, counts):
        index += range(offset + width - count, offset + width)
        offset += width
    return tuple(index)


# ---------------------------------------------------------------------------------------
# Widths


def _split(a: Analysis, stage: Stage, config: CSPConfig, notes: list[str]) -> tuple[int, int]:
    """(bypass, through) channels of the base output, the through part rounded to the
    groups the stream's layers need and to ``config.round_to`` (with a note where it was
    rounded)."""
    stream = a.spaces[a.info[stage.base].space]
    channels, gamma = stage.channels, config.gamma
    if stream.grouped:
        raise _Skip(
            f"grouped conv '{stream.grouped}' reads or writes its stream, and a contiguous "
            "through part would mix its groups"
        )
    wanted = channels - half_up(gamma * channels)
    if wanted < 1 or wanted > channels - 1:
        raise _Skip(f"gamma {gamma} leaves the {'through' if wanted < 1 else 'bypass'} part of its {channels} "
                    "channels empty")
    multiple = math.lcm(stream.blocks, config.round_to)
    through = round_to(wanted, multiple, 1, channels - 1)
    if through == 0:
        why = "round_to and its layers' groups" if config.round_to > 1 else "its layers' groups"
        raise _Skip(f"no through part of 1 to {channels - 1} of its {channels} channels is a multiple of {multiple} "
                    f"({why})")
    if through != wanted:
        notes.append(f"through part rounded from {wanted} to {through} channels (multiple of {multiple})")
    return channels - through, through


def _transition_keep(a: Analysis, stage: Stage, bypass: int) -> dict[int, tuple[int, ...]]:
    """Fusion last reuses the stage's own transition as the partial transition: its conv
    writes what the bypass does not fill, the last channels of its width."""
    gm, nodes = a.traced.gm, a.traced.nodes
    conv = next(n for n in stage.transition if role_of(nodes[n], gm) == "conv")
    root = a.spaces.find(a.info[conv].space)
    space = a.spaces[root]
    if space.width - bypass < 1 or (space.width - bypass) % space.blocks:
        raise _Skip(f"its transition ({space.width} channels) cannot take a bypass of {bypass} channels")
    return {root: tuple(range(bypass, space.width))}


def _scale_inner(a: Analysis, region, config: CSPConfig, keeps: dict[int, tuple[int, ...]]) -> list[str]:
    """Narrow every width the region's convs and linears write by ``1 - gamma`` (adds to
    ``keeps``): a plain or aggregation stage's ``inner`` layers always, every layer of the
    partial stage with hidden='scale'. Returns a note for each width rounded to its groups
    or to ``config.round_to``."""
    spaces, notes = a.spaces, []
    for name in region:
        node = a.traced.nodes[name]
        info = a.info.get(name)
        if role_of(node, a.traced.gm) not in ("conv", "linear") or info is None or info.space is None:
            continue
        root = spaces.find(info.space)
        space = spaces[root]
        if root in keeps or space.frozen or space.segments is not None:
            continue
        wanted = half_up((1 - config.gamma) * space.width)
        multiple = math.lcm(space.blocks, config.round_to)
        width = round_to(wanted, multiple, 1, space.width)
        if width == 0 or width == space.width:
            continue
        if width != wanted:
            notes.append(f"inner width of '{name}' rounded from {wanted} to {width} (multiple of {multiple})")
        keeps[root] = per_block_keep(space.width, width, space.blocks)
    return notes


# ---------------------------------------------------------------------------------------
# Narrowings


class _Resolver:
    """Keep indices of any space: set directly (``keeps``), or derived from them through the
    channel relations of the analysis (``cspify.channels.derive_keeps``: a concat keeps its
    segments' keeps, a chunk's piece its input's, a channel slice its source's).

    ``args`` maps (node, argument) to the new value of a literal size that narrowing changes
    (a slice's bounds, a split's sizes), which the rewrite writes in; ``moved`` says each in
    a sentence."""

    def __init__(self, a: Analysis, keeps: dict[int, tuple[int, ...]]) -> None:
        self.a, self.spaces, self.keeps, self.cache = a, a.spaces, keeps, {}
        self._derived: Keeps | None = None

    @property
    def args(self) -> dict[tuple[str, int | str], object]:
        return self._derive().args

    @property
    def moved(self) -> list[str]:
        """One sentence per literal size in ``args``: what it was, what it becomes."""
        return self._derive().moved

    def __call__(self, space: int | None) -> tuple[int, ...] | None:
        if space is None:
            return None
        root = self.spaces.find(space)
        if root not in self.cache:
            self.cache[root] = self._resolve(root)
        return self.cache[root]

    def _derive(self) -> Keeps:
        if self._derived is None:
            try:
                self._derived = derive_keeps(self.a, self.keeps)
            except EmptyPart as error:
                raise _EmptyPart(error) from None
            except NarrowingError as error:
                raise _Skip(str(error)) from None
        return self._derived

    def _resolve(self, root: int) -> tuple[int, ...] | None:
        info = self.spaces[root]
        try:
            keep = self._derive().of(root)
        except NarrowingError as error:
            raise _Skip(str(error)) from None
        if keep is not None and info.frozen:
            raise _Skip(f"{info.frozen}, so its channels cannot be narrowed")
        if keep is not None and len(keep) % info.blocks:
            raise _Skip(f"a width of {len(keep)} channels would not divide into the {info.blocks} groups a layer needs")
        return keep


def _narrowings(a: Analysis, region, resolve: _Resolver) -> dict[str, Narrowing]:
    """The layers to narrow, each with the input and output channels it keeps."""
    narrowings = {}
    params = [name for name in a.info if a.traced.nodes[name].op == "get_attr"]
    for name in list(region) + params:
        info = a.info.get(name)
        if info is None or info.space is None or not info.holds:
            continue
        out_keep = resolve(info.space)
        in_keep = resolve(info.reads) if info.reads is not None else out_keep
        node = a.traced.nodes[name]
        if in_keep is None and out_keep is None:
            continue
        if node.op == "get_attr":
            narrowings[name] = Narrowing(name, None, out_keep, axis=info.axis)
            continue
        if node.op != "call_module":
            continue
        op = rule_for(node, a.traced.gm)
        layer = a.traced.gm.get_submodule(node.target)
        if op is None or op.narrow is None:
            if any(True for _ in layer.parameters(recurse=True)):
                raise _Skip(f"'{name}' has parameters but no rule to narrow them")
            continue
        problem = reparametrization_problem(layer)
        if problem:
            raise _Skip(f"'{name}' ({type(layer).__name__}): {problem}")
        narrowings[name] = Narrowing(name, in_keep, out_keep)
    return narrowings


def _check_single_use(traced: Traced, narrowings: dict[str, Narrowing]) -> None:
    """A module or parameter used in several places can't be narrowed for one of them."""
    uses = Counter((n.op, n.target) for n in traced.gm.graph.nodes if n.op in ("call_module", "get_attr"))
    for name in narrowings:
        node = traced.nodes[name]
        count = uses[(node.op, node.target)] + (len(node.users) - 1 if node.op == "get_attr" else 0)
        if count > 1:
            raise _Skip(f"'{node.target}' is used {count} times and cannot be narrowed for one use "
                        "(a module the model calls several times converts on its own with --scope, scope=)")


# ---------------------------------------------------------------------------------------
# The partial transition


def _new_transition(stage: Stage, fusion: str, bypass: int, through_out: int, output: int) -> tuple[int, int] | None:
    """(in, out) channels of the 1x1 conv the rewrite adds, or None where none is added."""
    if fusion == "last":
        return None if stage.transition else (through_out, output - bypass)
    if bypass + through_out == output and stage.transition:
        return None  # the stage's own transition follows the concat
    return (bypass + through_out, output)


def _templates(a: Analysis, region, stage: Stage) -> tuple[str | None, str | None]:
    """The norm and activation the partial transition copies: the stage's first norm layer
    on its channel axis and the activation that follows it (none where the norm layer has
    its activation inside); without a norm, the first activation on the channel axis.
    A template works on the stream's layout: its channels are on the stage's channel axis,
    and so is the axis it treats as channels, if any (a BatchNorm2d fits no channels-last
    stream, a LayerNorm over the last axis does)."""
    gm, nodes = a.traced.gm, a.traced.nodes
    rank = len(shape(nodes[stage.base]))

    def on_axis(name):
        info = a.info.get(name)
        return (
            info is not None and info.axis == stage.channel_axis and len(shape(nodes[name]) or ()) == rank
            and channel_dim(nodes[name], gm) in (None, stage.channel_axis)
        )

    norm = next((n for n in region if nodes[n].op == "call_module" and role_of(nodes[n], gm) == "norm" and on_axis(n)), None)
    if norm is not None:
        users = list(nodes[norm].users)
        follows = len(users) == 1 and role_of(users[0], gm) == "act" and len(users[0].all_input_nodes) == 1
        return norm, users[0].name if follows else None
    act = next((n for n in region if role_of(nodes[n], gm) == "act" and len(nodes[n].all_input_nodes) == 1 and on_axis(n)), None)
    return None, act


def _group_norm_note(norm: nn.Module | None, new_transition: tuple[int, int] | None) -> list[str]:
    """A note where the new transition's GroupNorm cannot keep its template's groups."""
    groups = getattr(norm, "num_groups", 0)
    if not new_transition or not groups or new_transition[1] % groups == 0:
        return []
    width = new_transition[1]
    return [f"partial transition's GroupNorm uses {math.gcd(groups, width)} groups ({groups} do not divide {width} channels)"]


# ---------------------------------------------------------------------------------------
# Cost


def _cost_note(before: int, after: int, allow_costlier: bool) -> list[str]:
    """Refuse a stage whose conversion saves no multiply-adds (a note where allowed anyway)."""
    if after < before:
        return []
    cost = (
        f"converting it would add {after - before:,} multiply-adds: its new partial transition costs more "
        "than its narrowed blocks save" if after > before else "converting it would save no multiply-adds"
    )
    if not allow_costlier:
        raise _Costlier(f"{cost} (allow_costlier converts it anyway)")
    return [cost]


def _transition_cost(new_transition: tuple[int, int] | None, output: fx.Node, axis: int, norm: nn.Module | None) -> int:
    """Flops of the new partial transition's conv and norm, on feature maps like ``output``'s."""
    if new_transition is None:
        return 0
    in_channels, out_channels = new_transition
    return _positions(output, axis) * out_channels * (in_channels + _norm_cost(norm))


def _positions(node: fx.Node, axis: int) -> int:
    """How many positions (batch x spatial) a layer's output has per channel."""
    dims = shape(node)
    return math.prod(dims) // dims[axis]


def _norm_cost(norm: nn.Module | None) -> int:
    """Flops per element fvcore counts for a norm layer in eval mode (affine)."""
    if norm is None:
        return 0
    return 2 if isinstance(norm, nn.modules.batchnorm._BatchNorm) else 5


def stage_flops(traced: Traced, plan: StagePlan) -> tuple[int, int]:
    """The converted stage's flops before and after, as the planner estimates them (the
    partial stage's convs, linears and norms, and the new partial transition), counted as
    fvcore counts them; what ``cspify.budget`` chooses options by, without rewriting."""
    before, after = _cost(traced, plan.partial_stage, {n.node: n for n in plan.narrowings})
    norm = traced.gm.get_submodule(traced.nodes[plan.norm_template].target) if plan.norm_template else None
    transition = _transition_cost(plan.new_transition, traced.nodes[plan.through_output], plan.stage.channel_axis, norm)
    return before, after + transition


def _cost(traced: Traced, region, narrowings: dict[str, Narrowing]) -> tuple[int, int]:
    """Flops of the region's convs, linears and norm layers, before and after narrowing,
    counted as fvcore counts them (a multiply-add is one flop).

    A cheap estimate from the traced shapes, used only to decide whether a stage is worth
    converting; the report's figures come from fvcore itself.
    """
    whole = Narrowing("", None, None)
    before = after = 0
    for name in region:
        node = traced.nodes[name]
        role = role_of(node, traced.gm)
        if role == "norm" and node.op == "call_module":
            norm = traced.gm.get_submodule(node.target)
            keep = narrowings.get(name, whole).out_keep
            elements, width = math.prod(shape(node)), layer_width(norm)
            before += elements * _norm_cost(norm)
            after += elements * (len(keep) if keep is not None else width) // width * _norm_cost(norm)
        if role not in ("conv", "linear"):
            continue
        layer = traced.gm.get_submodule(node.target)
        if role == "conv":
            c_in, c_out, groups, kernel = layer.in_channels, layer.out_channels, layer.groups, math.prod(layer.kernel_size)
        else:
            c_in, c_out, groups, kernel = layer.in_features, layer.out_features, 1, 1
        narrowing = narrowings.get(name, whole)
        new_in = len(narrowing.in_keep) if narrowing.in_keep is not None else c_in
        new_out = len(narrowing.out_keep) if narrowing.out_keep is not None else c_out
        new_groups = new_out if groups > 1 and groups == c_in == c_out else groups
        positions = _positions(node, len(shape(node)) - 1 if role == "linear" else 1)
        before += positions * c_out * (c_in // groups) * kernel
        after += positions * new_out * (new_in // new_groups) * kernel
    return before, after
