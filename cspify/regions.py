"""Where a layer lies in a detector (backbone, neck, head), so that a report says per part
what the conversion saved: the pyramid's memory traffic and CIO apart from the backbone's.

    part = part_of(model)                 # None where no layout below fits the model
    part("model.19.cv1.conv")             # 'neck' (ultralytics: between backbone and head)
    regions(before, after, part)          # [Region('backbone', ...), Region('neck', ...), ...]

A layout is one entry of ``LAYOUTS``: given the model, a function from a module's path to
its part (None for a path it does not place), or None where the layout does not fit:

- ultralytics: the layers of its ``model`` list, by the model YAML's ``backbone`` and
  ``head`` lists: the backbone's, then the neck, then the last layer (the Detect head);
- torchvision's detectors: ``backbone.body``, ``backbone.fpn`` (the neck), and every other
  child with layers (``rpn``, ``roi_heads``, ``head``).

Measurements are per node; a node that calls no module (an add, a concat, a layer cspify
added under a new name) goes with the part of the module node before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from cspify.measure import Figures, Measurement

Part = Callable[[str], "str | None"]


def _ultralytics(model: nn.Module) -> Part | None:
    yaml = getattr(model, "yaml", None)
    if not isinstance(yaml, dict) or not isinstance(yaml.get("backbone"), list) or not isinstance(yaml.get("head"), list):
        return None  # .get: a converted model's YAML refuses item access to its layer lists
    backbone, last = len(yaml.get("backbone")), len(yaml.get("backbone")) + len(yaml.get("head")) - 1

    def part(path: str) -> str | None:
        top, _, rest = path.partition(".")
        index = rest.split(".")[0]
        if top != "model" or not index.isdigit():
            return None
        return "backbone" if int(index) < backbone else "head" if int(index) == last else "neck"

    return part


def _torchvision_detector(model: nn.Module) -> Part | None:
    backbone = getattr(model, "backbone", None)
    if not (isinstance(backbone, nn.Module) and hasattr(backbone, "body") and hasattr(backbone, "fpn")):
        return None
    named = {"backbone.body": "backbone", "backbone.fpn": "neck"}

    def part(path: str) -> str | None:
        where = next((label for prefix, label in named.items() if path == prefix or path.startswith(prefix + ".")), None)
        return where or ("head" if path.split(".")[0] not in ("backbone", "transform") else None)

    return part


LAYOUTS: dict[str, Callable[[nn.Module], Part | None]] = {
    "ultralytics": _ultralytics,
    "torchvision detection": _torchvision_detector,
}


def part_of(model: nn.Module, scope: str | None = None) -> Part | None:
    """The part function of the first layout that fits ``model``, for paths inside the module
    at ``scope`` (relative to it, as a scoped measurement names them); None where none fits."""
    for layout in LAYOUTS.values():
        part = layout(model)
        if part is not None:
            return part if not scope else (lambda path, part=part: part(f"{scope}.{path}"))
    return None


@dataclass(frozen=True)
class Region:
    """One part's figures before and after, and its largest layer before and after (path, flops)."""

    name: str
    before: Figures
    after: Figures
    largest_before: tuple[str, int]
    largest_after: tuple[str, int]

    def to_dict(self) -> dict:
        return {"name": self.name, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "largest_before": list(self.largest_before), "largest_after": list(self.largest_after)}


def nodes_by_part(m: Measurement, part: Part) -> dict[str, list[str]]:
    """Node names per part, in graph order."""
    groups: dict[str, list[str]] = {}
    current = next((p for t in m.node_targets.values() if (p := part(t)) is not None), None)
    for name in m.nodes:
        if name in m.node_targets and (placed := part(m.node_targets[name])) is not None:
            current = placed
        if current is not None:
            groups.setdefault(current, []).append(name)
    return groups


def largest_layer(m: Measurement, part: Part, label: str) -> tuple[str, int]:
    """The conv or linear with the most flops in one part (inside a module kept whole too)."""
    layers = {name: flops for name, flops in m.layer_flops.items() if part(name) == label}
    name = max(layers, key=layers.get, default="")
    return name, layers.get(name, 0)


def regions(before: Measurement, after: Measurement, part: Part) -> list[Region]:
    """Per part of the original, in graph order: both models' figures and largest layers."""
    groups_before, groups_after = nodes_by_part(before, part), nodes_by_part(after, part)
    return [Region(label, before.stage(nodes), after.stage(groups_after.get(label, [])),
                   largest_layer(before, part, label), largest_layer(after, part, label))
            for label, nodes in groups_before.items()]
