"""The conversion options, as one frozen record validated once."""

from __future__ import annotations

from dataclasses import dataclass

from cspify.errors import ConfigError
from cspify.rules import KINDS

FUSIONS = ("last", "first")
HIDDEN = ("keep", "scale")


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
    kinds:  the kinds of stage to look for (``cspify.rules.KINDS``: residual, dense,
            aggregation, plain); ``None`` looks for every kind. ``("residual", "dense")``
            is the paper's transform alone.
    """

    gamma: float = 0.5
    fusion: str = "last"
    hidden: str = "keep"
    stages: tuple[str, ...] | None = None
    allow_costlier: bool = False
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        try:
            gamma = float(self.gamma)
        except (TypeError, ValueError):
            raise ConfigError(
                f"gamma must be a number, got {self.gamma!r}.",
                "pass the bypass fraction, for example --gamma 0.5",
            ) from None
        if not 0.0 < gamma < 1.0:
            raise ConfigError(
                f"gamma must lie strictly between 0 and 1, got {gamma}.",
                "gamma is the fraction of channels that bypass the stage; the paper uses 0.5",
            )
        object.__setattr__(self, "gamma", gamma)
        if self.fusion not in FUSIONS:
            raise ConfigError(
                f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}.",
                "use 'last' (the paper's choice) unless you are reproducing its ablation",
            )
        if self.hidden not in HIDDEN:
            raise ConfigError(
                f"hidden must be one of {', '.join(HIDDEN)}, got {self.hidden!r}.",
                "'keep' keeps the blocks' inner widths, 'scale' narrows them by 1 - gamma",
            )
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))
        if self.kinds is not None:
            object.__setattr__(self, "kinds", _kinds(self.kinds))


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
