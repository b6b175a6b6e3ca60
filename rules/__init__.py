"""Stage patterns. Each rule is one function ``find(traced) -> list[Stage]`` in a file of
its own, registered under its kind in ``registry``; adding a pattern is adding one file
with one ``@register(kind, description)`` entry (and its kind to ``cspify.stage.KINDS``).

    from cspify import rules
    stages = rules.find_stages(traced)                          # every kind, named, in graph order
    stages = rules.find_stages(traced, kinds=("residual",))     # one kind only
    rules.DESCRIPTIONS                                          # kind -> what its stages are, one line

Rules find stages by graph structure only (adds, concats, shapes, reachability), never by
module names; names are given afterwards from the modules a stage contains.
"""

from cspify.rules import aggregation, dense, plain, residual  # noqa: F401  (the rules register themselves)
from cspify.rules.registry import DESCRIPTIONS, find_stages, register
from cspify.stage import KINDS

__all__ = ["DESCRIPTIONS", "KINDS", "find_stages", "register"]
