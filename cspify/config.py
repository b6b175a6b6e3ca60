"""The conversion options, as one frozen record validated once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cspify.errors import ConfigError
from cspify.stage import KINDS

FUSIONS = ("last", "first")
HIDDEN = ("keep", "scale")
SPLITS = ("importance", "last")
PYRAMIDS = ("none", "maxout")


@dataclass(frozen=True)
class CSPConfig:
    """What a conversion does.

    gamma:  fraction of the base layer's channels that take the bypass (0 < gamma < 1).
    fusion: ``last`` transitions the through part and then concatenates (the paper's
            choice); ``first`` concatenates and then transitions both parts.
    hidden: ``keep`` leaves the blocks' inner widths as they are (the paper's designs);
            ``scale`` narrows them by ``1 - gamma`` too.
    stages: names of the stages to convert; ``None`` converts every stage found.
    allow_costlier: also convert stages where the new partial transition costs more
            multiply-adds than the narrowed blocks save (skipped by default, with the reason).
    kinds:  the kinds of stage to look for (``cspify.stage.KINDS``: residual, dense,
            aggregation, plain); ``None`` looks for every kind. ``("residual", "dense")``
            is the paper's transform alone.
    stage_gammas, stage_hidden: per stage, a gamma or an inner-width choice that replaces
            ``gamma`` or ``hidden`` for that stage alone (``(("layer3", 0.75),)``, or a
            dict); what a budget (``convert(target_flops=...)``) chooses. ``for_stage``
            gives the options one stage is planned with.
    round_to: every width the conversion narrows (the through part, scaled inner widths)
            goes to a multiple of this many channels, the nearest to what gamma asks
            (with a note); 8 or 16 keeps CPU and GPU kernels on their fast paths
            (oneDNN's depthwise convs run 2x slower per channel off multiples of 16 on
            AVX-512). 1 rounds nothing.
    split:  which base channels run through the stage. ``last`` (the default): the last
            ``1 - gamma`` of them. ``importance``: those the stage works on most, measured
            on the images ``convert`` is given (``data``; ``cspify.importance``), each output
            channel kept in its place where the output's channels are the base's; without
            images, the last ones. (ACCURACY-ablations.md: importance calibrates better on the
            residual models, and ends 0.07-0.12 points lower after an epoch of distillation.)
    pyramid: ``none`` (the default) leaves a detector's feature pyramid as it is;
            ``maxout`` compresses every concat that fuses pyramid levels, where one conv
            reads it, by Maxout over pairs of channels, as the paper's Exact Fusion Model
            does, the conv reading half the channels (``cspify.pyramid``; ``calibrate``
            fits it).
    """

    gamma: float = 0.5
    fusion: str = "last"
    hidden: str = "keep"
    stages: tuple[str, ...] | None = None
    allow_costlier: bool = False
    kinds: tuple[str, ...] | None = None
    stage_gammas: tuple[tuple[str, float], ...] = ()
    stage_hidden: tuple[tuple[str, str], ...] = ()
    round_to: int = 1
    split: str = "last"
    pyramid: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", _gamma(self.gamma))
        if self.fusion not in FUSIONS:
            raise ConfigError(
                f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}.",
                "use 'last' (the paper's choice) unless you are reproducing its ablation",
            )
        _hidden(self.hidden)
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))
        if self.kinds is not None:
            object.__setattr__(self, "kinds", _kinds(self.kinds))
        object.__setattr__(self, "stage_gammas", _per_stage(self.stage_gammas, "stage_gammas", _gamma))
        object.__setattr__(self, "stage_hidden", _per_stage(self.stage_hidden, "stage_hidden", _hidden))
        object.__setattr__(self, "round_to", _round_to(self.round_to))
        if self.split not in SPLITS:
            raise ConfigError(
                f"split must be one of {', '.join(SPLITS)}, got {self.split!r}.",
                "'importance' lets the images choose the channels that run through, 'last' takes the last ones",
            )
        if self.pyramid not in PYRAMIDS:
            raise ConfigError(
                f"pyramid must be one of {', '.join(PYRAMIDS)}, got {self.pyramid!r}.",
                "'maxout' compresses the concats that fuse a detector's pyramid levels, 'none' leaves them",
            )

    def for_stage(self, name: str) -> CSPConfig:
        """The options the stage ``name`` is planned with: its own gamma and hidden where
        ``stage_gammas`` or ``stage_hidden`` name it, else the global ones."""
        gamma = dict(self.stage_gammas).get(name, self.gamma)
        hidden = dict(self.stage_hidden).get(name, self.hidden)
        if (gamma, hidden) == (self.gamma, self.hidden):
            return self
        return replace(self, gamma=gamma, hidden=hidden, stage_gammas=(), stage_hidden=())

    @property
    def per_stage(self) -> bool:
        """Whether some stage has options of its own."""
        return bool(self.stage_gammas or self.stage_hidden)


def _gamma(value) -> float:
    try:
        gamma = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"gamma must be a number, got {value!r}.",
            "pass the bypass fraction, for example --gamma 0.5",
        ) from None
    if not 0.0 < gamma < 1.0:
        raise ConfigError(
            f"gamma must lie strictly between 0 and 1, got {gamma}.",
            "gamma is the fraction of channels that bypass the stage; the paper uses 0.5",
        )
    return gamma


def _round_to(value) -> int:
    try:
        multiple = int(str(value).strip())  # 16 or "16"; not 2.5, "x" or None
    except ValueError:
        multiple = 0
    if multiple < 1:
        raise ConfigError(
            f"round_to must be a positive whole number of channels, got {value!r}.",
            "8 or 16 keeps CPU and GPU kernels on their fast paths; 1 rounds nothing",
        )
    return multiple


def _hidden(value) -> str:
    if value not in HIDDEN:
        raise ConfigError(
            f"hidden must be one of {', '.join(HIDDEN)}, got {value!r}.",
            "'keep' keeps the blocks' inner widths, 'scale' narrows them by 1 - gamma",
        )
    return value


def _per_stage(pairs, field: str, check) -> tuple:
    """``{"layer3": 0.75}`` or ``(("layer3", 0.75),)`` as a tuple of checked (stage, value) pairs."""
    try:
        items = tuple((name, value) for name, value in (pairs.items() if isinstance(pairs, dict) else pairs))
    except (TypeError, ValueError):
        raise ConfigError(
            f"{field} must map stage names to values, got {pairs!r}.",
            f"pass a dict such as {{'layer3': {0.75 if field == 'stage_gammas' else repr('scale')}}}",
        ) from None
    names = [name for name, _ in items]
    if any(not isinstance(name, str) for name in names):
        raise ConfigError(f"{field} names stages by their names (strings), got {names!r}.",
                          "use the names `cspify analyze` prints")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"{field} names {', '.join(map(repr, twice))} more than once.",
                          "give each stage one value")
    checked = []
    for name, value in items:
        try:
            checked.append((name, check(value)))
        except ConfigError as error:
            raise ConfigError(f"stage {name!r}: {error.message}", error.hint) from None
    return tuple(checked)


def _kinds(kinds) -> tuple[str, ...]:
    """``"residual,dense"`` or an iterable of kinds, checked against the rules, in rule order."""
    wanted = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    unknown = [k for k in wanted if k not in KINDS]
    if unknown or not wanted:
        raise ConfigError(
            f"{', '.join(repr(k) for k in unknown) or 'no kind'} is not a kind of stage cspify finds.",
            f"choose among {', '.join(KINDS)}, for example --kind residual,dense for the paper's transform alone",
        )
    return tuple(k for k in KINDS if k in wanted)
