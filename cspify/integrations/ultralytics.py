"""Training a converted ultralytics YOLO with ultralytics' own trainer, data format,
validator and checkpoints.

    from ultralytics import YOLO
    from cspify.integrations import ultralytics as csp_yolo

    csp = cspify.convert(YOLO("yolov3.yaml").model, torch.randn(1, 3, 320, 320))
    csp_yolo.save(csp, "yolov3-csp.pt")             # an ultralytics checkpoint of the CSP model
    model = YOLO("yolov3-csp.pt")                   # loads as the converted architecture
    model.train(data="data.yaml", epochs=10, imgsz=320, trainer=csp_yolo.Trainer)
    model.val(data="data.yaml"); model.predict(image)

Left to itself, ultralytics' trainer rebuilds the model from its YAML (``DetectionModel(cfg)``)
and copies in the weights whose names and shapes still fit: the conversion would be lost
without a word. ``Trainer`` trains the converted model itself instead. A model ``save`` wrote
carries a guarded YAML, so that the trainer's default path, which would rebuild the
original architecture, stops with one sentence saying to pass ``trainer=Trainer``.

A model converted whole is a GraphModule; ``save`` puts it in a ``ConvertedDetectionModel``,
a ``DetectionModel`` whose layers are that graph: ultralytics' loss, EMA, checkpoints,
validator and predictor use it as they use their own (the head it reads as ``model[-1]`` is
the Detect module inside the graph). A model converted with ``scope=`` is a DetectionModel
already, and is saved as it is, with its YAML guarded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from cspify.errors import ConfigError
from cspify.files import atomic_file
from cspify.load import import_ultralytics
from cspify.record import attach, conversion_of

_ultralytics = import_ultralytics()

from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.modules.head import Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

__all__ = ["ConvertedDetectionModel", "Trainer", "save", "detection_model"]

TRAINER_HINT = "train it with model.train(..., trainer=cspify.integrations.ultralytics.Trainer)"


class GuardedYaml(dict):
    """A converted model's YAML: read as the dict it is, except that building a model from
    it (which reads its layer lists) is refused, since that model would be the original."""

    def __getitem__(self, key):
        if key in ("backbone", "head"):
            raise ConfigError("this YOLO is a cspify conversion, and ultralytics' default trainer would rebuild "
                              "the original architecture from its YAML, losing the conversion.", TRAINER_HINT)
        return super().__getitem__(key)

    def layers(self) -> dict:
        """The YAML as a plain dict (its layer lists readable)."""
        return dict(self.items())


class _KeepsRecords:
    """Pickles with cspify's conversion records, which torch.fx's unpickling of a
    GraphModule drops (it leaves ``meta`` empty), so a checkpoint loads still converted."""

    def __getstate__(self):
        records = {name: conversion_of(m) for name, m in self.named_modules() if conversion_of(m) is not None}
        return {**self.__dict__, "_cspify_records": records}

    def __setstate__(self, state):
        records = state.pop("_cspify_records", {})
        super().__setstate__(state)
        for name, record in records.items():
            attach(self.get_submodule(name), record)


class ScopedDetectionModel(_KeepsRecords, DetectionModel):
    """A DetectionModel converted with ``scope=``: ultralytics' own layers, one of them a
    converted GraphModule."""


class ConvertedDetectionModel(_KeepsRecords, DetectionModel):
    """A DetectionModel whose layers are a converted GraphModule (``graph``)."""

    def __init__(self, graph: fx.GraphModule, head: str) -> None:
        nn.Module.__init__(self)
        self.graph = graph
        self.head = head
        for name in ("yaml", "names", "stride", "args", "nc", "task", "inplace"):
            if hasattr(graph, name):
                setattr(self, name, copy.deepcopy(getattr(graph, name)))
        self.yaml = GuardedYaml(self.yaml)
        self.save = []

    @property
    def model(self) -> tuple[nn.Module]:
        """What ultralytics reads of a model's layer list: its last entry, the Detect head."""
        return (self.graph.get_submodule(self.head),)

    def _predict_once(self, x, profile=False, visualize=False, embed=None):
        if profile or visualize or embed:
            raise ConfigError("a converted YOLO runs as one graph, so it has no per-layer profile, visualisation "
                              "or embeddings.", "run it without profile, visualize and embed")
        return self.graph(x)

    def fuse(self, verbose=True, imgsz=640):
        """Norms folded into their convs (``cspify.fuse``), in eval mode; in training mode, as it is."""
        if self.training or getattr(self, "_fused", False):
            return self
        from cspify.fuse import fuse_for_inference

        size = int(self.stride.max()) * 2
        self.graph = fuse_for_inference(self.graph, (torch.zeros(1, self.yaml.get("channels", 3), size, size),))
        self._fused = True
        return self

    def is_fused(self, thresh=10):
        return getattr(self, "_fused", False)


class Trainer(DetectionTrainer):
    """ultralytics' DetectionTrainer, training the converted model it is given instead of
    rebuilding one from the YAML."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        if weights is None or not _converted(weights):
            raise ConfigError("cspify's Trainer trains a converted model, and this one is not converted "
                              "(or pretrained=False dropped it).",
                              "load the checkpoint cspify.integrations.ultralytics.save wrote, with pretrained left on")
        head = weights.model[-1]
        if head.nc != self.data["nc"]:
            raise ConfigError(f"the converted model detects {head.nc} classes and the dataset has "
                              f"{self.data['nc']}.", "convert a model built for the dataset's classes: "
                              "DetectionModel(cfg, nc=N), then cspify.convert")
        return self.set_model_names_for_load(weights)


def detection_model(model: nn.Module) -> DetectionModel:
    """A copy of a converted ultralytics model as the DetectionModel ultralytics trains."""
    if not _converted(model):
        raise ConfigError("the model is not converted by cspify.", "give the model cspify.convert returned")
    if isinstance(model, DetectionModel):  # converted with scope=: still ultralytics' own class
        if type(model) not in (DetectionModel, ScopedDetectionModel):
            raise ConfigError(f"a {type(model).__name__} converted with scope= is not a plain DetectionModel, which "
                              "is all cspify's Trainer trains.", "convert a detection model")
        model = copy.deepcopy(model)
        model.__class__ = ScopedDetectionModel
        model.yaml = GuardedYaml(model.yaml)
        return model
    heads = [name for name, m in model.named_modules() if isinstance(m, Detect)]
    if not isinstance(model, fx.GraphModule) or not hasattr(model, "yaml") or not heads:
        raise ConfigError("the model is not a converted ultralytics detection model (no YAML and Detect head).",
                          "convert the model of YOLO(...).model for a detection task")
    return ConvertedDetectionModel(copy.deepcopy(model), heads[-1])


def _converted(model: nn.Module) -> bool:
    return any(conversion_of(m) is not None for m in model.modules())


def save(model: nn.Module, path) -> Path:
    """Write the converted ``model`` as an ultralytics checkpoint that ``YOLO(path)`` loads
    (atomically: nothing is left half-written)."""
    detector = detection_model(model).float().eval()
    state = {"model": detector, "train_args": {"task": "detect"}, "epoch": -1,
             "version": _ultralytics.__version__}
    with atomic_file(str(path), name=f"the checkpoint {str(path)!r}", hint="choose a folder you can write to") as f:
        torch.save(state, f)
    return Path(path)
