"""Which base channels run through a stage, measured on images: the split by importance.

    scores = measure(traced, stages, batches)   # {stage name: one score per base channel}
    through_of(scores["layer1"], 32)            # the 32 channels that matter most, in order
    importance = Importance(images)             # what convert(data=images) makes: measures once per stage

A stage's through part is where its blocks do their work; its bypass carries channels as
they are. So the channels that run through are those the stage works on most, measured on
the user's images by a criterion per kind of stage (``CRITERIA``: a new kind is one entry):

- residual: how much the blocks change each channel, ``rms(y_c - x_c)`` over the images
  (x the base output, y the stage output). A channel the blocks barely change is nearly its
  own output already: it takes the bypass, and stays where it was in the output, so what the
  bypass gets wrong is least. (Measured against the change relative to ``rms(x_c)`` and
  against the readers' criterion below, calibrated, 3 seeds: the absolute change was the
  best on the ResNet-like model and the second on the MobileNetV2-like one.)
- every other kind (``DEFAULT``: dense, plain, aggregation): how much the layers that read
  the base use each channel: ``rms(x_c)`` times the norm of their input weights for c, a
  BatchNorm on the way scaling it by ``|weight| / sqrt(running_var + eps)``, as magnitude
  importance criteria for pruning do.

The original model runs once over the images in eval mode, nothing of it changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from cspify.batches import image_batches
from cspify.errors import ConfigError
from cspify.graph import cat_args, shape
from cspify.ops import role_of
from cspify.stage import Stage
from cspify.taps import tapping
from cspify.trace import Traced, capture_inputs, device_of, eval_mode

__all__ = ["Importance", "measure", "through_of", "CRITERIA", "IMAGES"]

IMAGES = 512  # the images a split by importance reads: enough for per-channel statistics

PASSES = ("act", "identity", "pool", "elementwise", "add")  # keep each channel where it is


class _Sums:
    """Per-channel sums of squares over the images: of the base output, and (residual) of
    what the stage changed."""

    def __init__(self, channels: int) -> None:
        self.base = torch.zeros(channels, dtype=torch.float64)
        self.change = torch.zeros(channels, dtype=torch.float64)
        self.count = 0


def _per_channel(value: torch.Tensor, axis: int) -> torch.Tensor:
    dims = [d for d in range(value.dim()) if d != axis]
    return value.double().square().sum(dims).cpu()


def _change(traced: Traced, stage: Stage, sums: _Sums) -> torch.Tensor:
    return (sums.change / max(sums.count, 1)).sqrt()


def _use(traced: Traced, stage: Stage, sums: _Sums) -> torch.Tensor:
    rms = (sums.base / max(sums.count, 1)).sqrt()
    weights = reader_weights(traced, stage)
    return rms * weights if weights.any() else rms


Criterion = Callable[[Traced, Stage, _Sums], torch.Tensor]
CRITERIA: dict[str, Criterion] = {"residual": _change}
DEFAULT: Criterion = _use


class Importance:
    """The images a conversion measures its split on (at most ``max_images`` of ``data``:
    a tensor, a Dataset or batches, as ``calibrate`` reads them), and the scores measured,
    kept per stage: a budget's many conversions of one model measure each stage once."""

    def __init__(self, data, max_images: int = IMAGES, batch_size: int = 128, seed: int = 0) -> None:
        self.batches = [b if isinstance(b, tuple) else (b,) for b in image_batches(data, max_images, batch_size, seed)]
        self.images = sum(len(b[0]) for b in self.batches)
        self._scores: dict[str, torch.Tensor] = {}

    def scores(self, traced: Traced, stages: list[Stage]) -> dict[str, torch.Tensor]:
        """Each stage's scores (``measure``), measured where not yet."""
        todo = [s for s in stages if s.name not in self._scores]
        if todo:
            self._scores.update(measure(traced, todo, self.batches))
        return {s.name: self._scores[s.name] for s in stages if s.name in self._scores}

    @property
    def measured(self) -> dict[str, torch.Tensor]:
        """The scores measured so far, per stage name."""
        return dict(self._scores)

    @classmethod
    def of(cls, scores: dict[str, torch.Tensor], images: int) -> Importance:
        """Scores measured elsewhere (another process's, under torch.distributed), reused as
        they are: every process then chooses the same channels."""
        importance = cls.__new__(cls)
        importance.batches, importance.images, importance._scores = [], images, dict(scores)
        return importance

    def within(self, model: nn.Module, scope: str) -> Importance:
        """The same images as the submodule at ``scope`` receives them when ``model`` runs."""
        part = Importance.of({}, self.images)
        part.batches = [capture_inputs(model, batch, scope)[1] for batch in self.batches]
        return part


def measure(traced: Traced, stages: list[Stage], batches) -> dict[str, torch.Tensor]:
    """One score per base channel of each stage (higher: it should run through), over
    ``batches`` of input images run through the traced original."""
    stages = [s for s in stages if s.channel_axis is not None and s.channels > 1]
    changed = {s.name for s in stages if shape(traced.nodes[s.output]) == shape(traced.nodes[s.base])}
    names = {s.base for s in stages} | {s.output for s in stages if s.name in changed}
    sums = {s.name: _Sums(s.channels) for s in stages}
    gm = traced.gm
    device = device_of(gm)
    with eval_mode(gm), tapping(gm, names, detach=True) as values:
        for batch in batches:
            batch = batch if isinstance(batch, tuple) else (batch,)
            try:
                gm(*(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch))
            except Exception as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ConfigError(f"the model does not run on the images given to split by importance ({first}).",
                                  "give images shaped as the model's inputs (the example inputs' channels and size)",
                                  ) from None
            for s in stages:
                x = values[s.base]
                total = sums[s.name]
                total.base += _per_channel(x, s.channel_axis)
                total.count += x.numel() // s.channels
                if s.name in changed:
                    total.change += _per_channel(values[s.output] - x, s.channel_axis)
    return {s.name: CRITERIA.get(s.kind, DEFAULT)(traced, s, sums[s.name]).float() for s in stages}


def through_of(scores: torch.Tensor, through: int) -> tuple[int, ...]:
    """The ``through`` channels of highest score, in channel order (ties: the later channel,
    so that equal scores give the last channels, the structural split)."""
    order = sorted(range(len(scores)), key=lambda c: (float(scores[c]), c), reverse=True)
    return tuple(sorted(order[:through]))


def reader_weights(traced: Traced, stage: Stage) -> torch.Tensor:
    """Per base channel, the summed norm of the input weights of the stage's conv and linear
    layers that read it, through activations, pools, adds, concats (at the channel's offset)
    and BatchNorms (scaled by theirs); zeros where no such layer reads the base."""
    gm, nodes, inside = traced.gm, traced.nodes, set(stage.nodes)
    axis, channels = stage.channel_axis, stage.channels
    total = torch.zeros(channels)
    todo = [(nodes[stage.base], 0, torch.ones(channels))]
    seen: set[tuple[str, int]] = set()
    while todo:
        node, offset, scale = todo.pop()
        for user in node.users:
            if user.name not in inside or (user.name, offset) in seen:
                continue
            seen.add((user.name, offset))
            role = role_of(user, gm)
            layer = gm.get_submodule(user.target) if user.op == "call_module" else None
            if role in ("conv", "linear") and layer is not None and user.args[0] is node:
                total += scale * _input_norms(layer, offset, channels)
            elif role == "norm" and isinstance(layer, _BatchNorm) and layer.track_running_stats:
                part = slice(offset, offset + channels)
                weight = layer.weight[part].abs() if layer.affine else 1.0
                todo.append((user, offset, scale * (weight / (layer.running_var[part] + layer.eps).sqrt()).detach().cpu()))
            elif role in PASSES:
                todo.append((user, offset, scale))
            elif role == "cat":
                shifted = _cat_offset(user, node, axis)
                if shifted is not None:
                    todo.append((user, offset + shifted, scale))
    return total


def _input_norms(layer: nn.Module, offset: int, channels: int) -> torch.Tensor:
    """The L2 norm of ``layer``'s weights over each of its input channels offset..offset+channels."""
    weight = layer.weight.detach().float().cpu()
    if getattr(layer, "groups", 1) != 1:
        return torch.zeros(channels)
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)[offset:offset + channels]
    return columns.norm(dim=1) if len(columns) == channels else torch.zeros(channels)


def _cat_offset(cat: fx.Node, part: fx.Node, axis: int) -> int | None:
    """Where ``part``'s channels begin in the concat ``cat`` (None: it joins another axis)."""
    parts, dim = cat_args(cat)
    dims = shape(part)
    if dims is None or dim % len(dims) != axis:
        return None
    offset = 0
    for p in parts:
        if p is part:
            return offset
        offset += shape(p)[axis]
    return None
