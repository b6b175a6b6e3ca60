"""Recovering accuracy: convert, calibrate on unlabeled images, fine-tune with distillation
from the original, and score both models; one record of it all.

    data = cspify.open_data("/usr/share/datasets/fashion-mnist")
    done = cspify.recover(model, torch.randn(1, 1, 28, 28), data, epochs=1, checkpoint="csp.ckpt")
    done.csp                 # the converted, calibrated, fine-tuned model
    print(done)              # top-1, flops and params of both models, side by side
    done.to_dict()           # what ``cspify finetune --json`` writes

``steps`` names each step as it starts: a callable that takes a sentence ("calibrating on
2048 images") and returns a context manager around the step (the CLI's progress lines).
A stop (KeyboardInterrupt) during fine-tuning propagates with ``.checkpoint`` set to the
checkpoint and ``.completed`` to the epochs it holds (0: none completed, nothing written).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tabulate import tabulate

from cspify import api
from cspify.calibrate import Calibration, calibrate
from cspify.config import CSPConfig
from cspify.data import ImageData, check_fits
from cspify.errors import DataError
from cspify.finetune import Recipe, FinetuneRun, evaluate, finetune
from cspify.importance import Importance
from cspify.record import CALIBRATE_KEY, FINETUNE_KEY, INPUTS_KEY, leave_step_record, step_record
from cspify.report import Report, human

__all__ = ["recover", "Recovery", "calibrate_on"]

Steps = Callable[[str], AbstractContextManager]


def _silent(what: str) -> AbstractContextManager:
    return nullcontext()


@dataclass(frozen=True)
class Recovery:
    """What ``recover`` did: the converted model, both models measured and scored, and the
    records calibration and fine-tuning left (None for a step that did not run)."""

    csp: nn.Module
    data: ImageData
    report: Report                  # flops and params of both models, and the conversion
    original_top1: float
    top1_before: float | None       # the converted model's, before fine-tuning (after calibration)
    top1: float | None              # after fine-tuning: the kept model's (finetune's ``keep``)
    calibration: Calibration | None
    run: FinetuneRun | None

    def to_dict(self) -> dict:
        original, converted = self.report.original, self.report.converted
        return {
            "data": self.data.summary(),
            "original": {"top1": self.original_top1, "flops": original.flops, "params": original.params},
            "converted": {"top1_before_finetune": self.top1_before, "top1": self.top1, "flops": converted.flops,
                          "params": converted.params},
            "conversion": self.report.to_dict(),
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "finetune": self.run.to_dict() if self.run is not None else None,
        }

    def table(self, fmt: str = "simple") -> str:
        """Top-1, flops and params of the original and the converted model, side by side."""
        o, c = self.report.original, self.report.converted
        rows = [
            ["top-1 (val)", _percent(self.original_top1), _percent(self.top1),
             f"{100 * (self.top1 - self.original_top1):+.2f} pts" if self.top1 is not None else ""],
            ["  before fine-tuning", "", _percent(self.top1_before), ""],
            ["flops", human(o.flops), human(c.flops), f"{100 * (1 - c.flops / o.flops):.1f}% saved"],
            ["params", human(o.params), human(c.params), f"{100 * (1 - c.params / o.params):.1f}% saved"],
        ]
        return tabulate(rows, headers=["", "original", "converted", "change"], tablefmt=fmt, disable_numparse=True)

    def __str__(self) -> str:
        return self.table()


def recover(
    model: nn.Module,
    example_inputs,
    data: ImageData,
    *,
    config: CSPConfig | None = None,
    scope: str | None = None,
    leaf_modules=(),
    seed: int = 0,
    calibration_images: int | None = 2048,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float | None = None,
    use_labels: bool = True,
    recipe: Recipe | None = None,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = False,
    steps: Steps | None = None,
    name: str | None = None,
    allow_chance: bool = False,
    keep: str = "best",
    max_steps: int | None = None,
) -> Recovery:
    """Convert ``model`` (``cspify.convert`` with ``config``, ``scope``, ``leaf_modules``,
    ``seed``), calibrate it on ``calibration_images`` of ``data``'s training images (None:
    not at all; a resumed run was calibrated before), fine-tune it for ``epochs`` with
    distillation from ``model`` (``cspify.finetune``; 0: calibrate only), and score both
    on ``data``'s validation images. ``model`` moves to ``device``.

    A DataError first when ``model`` cannot take ``data``'s images or has fewer outputs
    than it has classes (``name`` is what the sentence calls the model). ``progress``
    shows fine-tuning's bars; ``steps`` names the other steps (see the module's docstring).
    A DataError, before anything is fitted, when the original scores near chance on the
    validation images (its inputs preprocessed otherwise than it was trained on, or wrong or
    no weights), unless ``allow_chance``. The converted model keeps the normalisation of
    ``data`` at ``meta["cspify.inputs"]``.
    """
    steps = steps or _silent
    check_fits(model, data, name)
    measured = bool(calibration_images) and (config or CSPConfig()).split == "importance"
    with steps("tracing and converting" + (" (measuring the split on the images)" if measured else "")):
        csp = convert_on(model, example_inputs, data.train if measured else None, config=config,
                         scope=scope, leaf_modules=leaf_modules, seed=seed)
    with steps("counting flops"):
        report = api.compare(model, csp, example_inputs, scope=scope, leaf_modules=leaf_modules)
    device = torch.device(device)
    model.to(device), csp.to(device)
    with steps("scoring the original on the validation images"):
        original_top1 = evaluate(model, data.val, device)
    chance = 1 / max(data.num_classes, 1)
    if original_top1 <= 1.5 * chance and not allow_chance:
        raise DataError(
            f"{name or type(model).__name__} scores {100 * original_top1:.1f}% on the validation images of "
            f"{data.source}, about chance ({100 * chance:.1f}% for {data.num_classes} classes), with inputs normalised "
            f"{data.normalisation}: the preprocessing likely differs from its training's, or its weights are wrong "
            f"or missing.", "set the normalisation it was trained with (--mean/--std), pass its weights with --weights, "
                            "or go on anyway with --allow-chance")
    leave_step_record(csp, INPUTS_KEY, {"mean": list(data.mean), "std": list(data.std)})
    if calibration_images and resume is None:
        calibrate_on(model, csp, data, calibration_images, steps)
    if epochs:
        try:
            finetune(csp, data.train, teacher=model, epochs=epochs, val_data=data.val, lr=lr, batch_size=batch_size,
                     use_labels=use_labels, recipe=recipe or Recipe(), device=device, bf16=bf16,
                     checkpoint=checkpoint, resume=resume, progress=progress, seed=seed, num_workers=num_workers,
                     keep=keep, max_steps=max_steps)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as the CLI turns it into one
            stop.checkpoint = checkpoint
            run = step_record(csp, FINETUNE_KEY)
            written = checkpoint is not None and os.path.exists(checkpoint)
            stop.completed = len(run.epochs) if run is not None and written else 0
            raise
    run = step_record(csp, FINETUNE_KEY)
    if run is None:  # epochs 0
        with steps("scoring the converted model"):
            before = after = evaluate(csp, data.val, device)
    else:  # finetune scored it before its first epoch (a resumed run kept that score)
        before, after = run.val_top1_before, run.kept_top1
    return Recovery(csp, data, report, original_top1, before, after, step_record(csp, CALIBRATE_KEY), run)


def convert_on(model: nn.Module, example_inputs, images=None, **options) -> nn.Module:
    """``api.convert(model, example_inputs, data=images, **options)``: ``images`` choose the
    split. Under torch.distributed every process calls it: rank 0 measures, and every rank
    converts with its scores, so that all choose the same channels."""
    parallel = dist.is_available() and dist.is_initialized()
    if images is None or not parallel:
        importance = Importance(images, seed=options.get("seed", 0)) if images is not None else None
        return api.convert(model, example_inputs, data=importance, **options)
    if dist.get_rank() == 0:
        importance = Importance(images, seed=options.get("seed", 0))
        csp = api.convert(model, example_inputs, data=importance, **options)
        dist.broadcast_object_list([(importance.measured, importance.images)], src=0)
        return csp
    shared = [None]
    dist.broadcast_object_list(shared, src=0)
    return api.convert(model, example_inputs, data=Importance.of(*shared[0]), **options)


def calibrate_on(model: nn.Module, csp: nn.Module, data: ImageData, images: int = 2048,
                 steps: Steps | None = None) -> None:
    """Calibrate ``csp`` on ``images`` training images of ``data`` (no labels), as one step."""
    count = min(images, len(data.train))
    with (steps or _silent)(f"calibrating on {count} images"):
        calibrate(model, csp, data.train, max_images=count)


def _percent(value: float | None) -> str:
    return f"{100 * value:.2f}%" if value is not None else "-"
