"""How close a converted model is to its original on unlabeled images: what a budget that
reads accuracy measures.

    evidence = Evidence(images)                     # calibration images and held-out ones
    judged = evidence.judge(original, converted)    # calibrated on the first, judged on the others
    judged.loss, judged.agreement                   # KL of the outputs; top-1 agreement (classifiers)

A model whose output is one (N, K) tensor is judged as a classifier: the KL divergence from
the original's softmax to the converted model's, and the share of images where both predict
the same class. Any other output (a detector's tuple of maps) is judged by its relative
squared error, the summed squared difference over the original's summed squares; it has no
agreement. Labels are never read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cspify.batches import image_batches
from cspify.calibrate import calibrate
from cspify.errors import ConfigError
from cspify.trace import device_of, eval_mode

__all__ = ["Evidence", "Judged", "MIN_IMAGES"]

FIT, HELD = 512, 256   # images calibration fits on, and images the judgement reads
MIN_IMAGES = 64        # fewer leave either part too small to tell options apart


@dataclass(frozen=True)
class Judged:
    """One model against the original on the held-out images."""

    loss: float                # KL (classifiers) or relative squared error (other outputs)
    agreement: float | None    # share of images with the original's top-1 class (classifiers)
    measure: str               # "KL" or "relative error"

    def __str__(self) -> str:
        agree = f", top-1 agreement {100 * self.agreement:.1f}%" if self.agreement is not None else ""
        return f"{self.measure} {self.loss:.4g}{agree}"


class Evidence:
    """Up to ``fit + held`` images of ``data`` (a tensor, a Dataset or batches): the first
    ``fit`` calibrate each candidate, the last ``held`` (a third where there are fewer)
    judge it. Fewer than ``MIN_IMAGES`` are refused."""

    def __init__(self, data, fit: int = FIT, held: int = HELD, seed: int = 0) -> None:
        images = torch.cat([b if isinstance(b, torch.Tensor) else b[0]
                            for b in image_batches(data, fit + held, 128, seed)])
        if len(images) < MIN_IMAGES:
            raise ConfigError(f"a budget that reads accuracy needs at least {MIN_IMAGES} images to calibrate and "
                              f"judge each option on, and the data has {len(images)}.",
                              f"give {MIN_IMAGES} or more images, or leave the data out to cut by flops alone")
        held = min(held, len(images) // 3)
        self.fit, self.held = images[:-held], images[-held:]
        self._expected = None

    @property
    def images(self) -> int:
        return len(self.fit) + len(self.held)

    def judge(self, original: nn.Module, converted: nn.Module, calibrated: bool = False) -> Judged:
        """``converted`` (a copy of it, calibrated on the fit images unless ``calibrated``)
        against ``original`` on the held-out images."""
        if not calibrated:
            converted = calibrate(original, copy.deepcopy(converted), self.fit, max_images=len(self.fit))
        if self._expected is None:
            self._expected = _outputs(original, self.held)
        return _compare(self._expected, _outputs(converted, self.held))


def _outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the model outputs for ``images``, flattened per image, on the CPU."""
    device = device_of(model)
    with eval_mode(model):
        out = model(images.to(device))
    return [t.detach().float().cpu().flatten(1) for t in _tensors(out)]


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _compare(theirs: list[torch.Tensor], mine: list[torch.Tensor]) -> Judged:
    if len(theirs) == 1 and theirs[0].dim() == 2 and theirs[0].shape[1] > 1:
        target, logits = theirs[0], mine[0]
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target, 1), reduction="batchmean", log_target=True)
        agreement = (logits.argmax(1) == target.argmax(1)).float().mean()
        return Judged(float(kl), float(agreement), "KL")
    error = sum(float((a - b).square().sum()) for a, b in zip(theirs, mine))
    size = sum(float(a.square().sum()) for a in theirs)
    return Judged(error / max(size, 1e-12), None, "relative error")
