"""Fine-tuning with distillation from the original: logits and every converted stage's output.

    csp = cspify.convert(model, x)
    cspify.calibrate(model, csp, data.train)                     # no labels, no gradient step
    cspify.finetune(csp, data.train, teacher=model, epochs=1, val_data=data.val)
    csp.meta["cspify.finetune"].to_dict()                        # per-epoch losses, val top-1, images/s
    cspify.evaluate(csp, data.val)                               # top-1

Losses, each weighted (``ce_weight``, ``kd_weight``, ``feature_weight``):

- cross-entropy on the labels, where the data has labels (and ``use_labels``);
- logit distillation: KL divergence between the teacher's and the model's softened outputs
  (``temperature`` T), scaled by T^2 so its gradients keep their size;
- feature distillation at each converted stage's output: a CSP stage output has the
  original stage output's shape, so the converted model's ``converted_output`` node is
  compared to the teacher's ``output`` node directly (mean squared error over the teacher
  feature's variance), without adapters and without labels. Under fusion last only the
  through part's channels are compared (``Recipe.features``): the bypass channels carry
  x0' by construction, and pulling them toward the original's stage output would pull the
  base layer away from what the through part needs.

Without labels (``train_data`` yields inputs alone, or ``use_labels=False``) only the two
distillation losses train it. The default recipe (``Recipe``: SGD with Nesterov momentum,
lr 0.02 at any batch and process count, 10% linear warm-up then a cosine to zero, BatchNorm in train mode,
all three losses at weight 1, T = 4) is what ``cspify finetune`` runs; it was chosen on
Fashion-MNIST among AdamW, other learning rates and loss mixes, all of which landed within
half a point of it after one epoch from a calibrated model.

Data-parallel: when ``torch.distributed`` is initialised (``torchrun --nproc_per_node N``
initialises it from the environment, and ``finetune`` does so itself when it sees
torchrun's variables), the model is wrapped in DistributedDataParallel (gloo on CPU, NCCL
on CUDA), each process reads its share of the data through a DistributedSampler, runs its
own teacher, and only rank 0 writes checkpoints and prints. ``batch_size`` is per process.

Checkpoints: with ``checkpoint=PATH`` the model, optimizer, scheduler, epoch, RNG states and
the run's record are written after every epoch, atomically (a temporary file renamed into
place), so Ctrl-C leaves the last complete one; ``resume=PATH`` with the arguments of the
run it continues ends with the weights that run would have ended with (data order is
seeded per epoch, the RNG states come back). A larger ``epochs`` extends a finished run,
with the schedule stretched over the new total.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DistributedSampler

from cspify import checkpoints
from cspify.batches import batch_source, split_batch
from cspify.errors import ConfigError
from cspify.graph import cat_args, uncast
from cspify.record import FINETUNE_KEY, find_conversions, leave_step_record
from cspify.taps import tapping
from cspify.trace import device_of, eval_mode, traced_originals

__all__ = ["finetune", "evaluate", "FinetuneRun", "EpochRecord", "Recipe", "DEFAULT_RECIPE", "init_distributed"]


@dataclass(frozen=True)
class Recipe:
    """Optimizer, schedule, BatchNorm handling and feature targets of a fine-tuning run.

    ``lr`` is the rate at any batch and process count (``lr_scaling="none"``): scaling it
    with the global batch ("linear": ``lr x global batch / lr_batch``, or "sqrt") is what
    destroyed calibrated models at 2 processes or batch 512 (on Fashion-MNIST a calibrated
    ResNet-like at 87.2% fell to 14.1% at a global batch of 1,024 with the linear rule, where the
    unscaled rate ends at 87.7%: ACCURACY-ablations.md, "batch and processes"). The schedule is a
    linear warm-up over ``warmup`` of the steps, then a cosine to zero; ``clip`` caps the
    gradients' total norm per step.
    Norms and biases get no weight decay. ``norms`` is "train" (BatchNorm normalises by the
    batch and updates its running statistics, as in training) or "frozen" (eval mode: the
    calibrated statistics stay; each sample's gradient no longer depends on its batch, so
    data-parallel runs equal one process exactly, but without the normalisation the default
    rate diverges: give a rate about 20 times smaller, 0.001 on Fashion-MNIST).
    ``features`` is "through" (fusion last: distil the through part's channels of each
    stage output) or "all".
    """

    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov) or "adamw"
    lr: float = 0.02
    lr_batch: int = 128
    lr_scaling: str = "none"  # with the global batch: "none" (lr as given at any batch), "sqrt" or "linear"
    clip: float | None = None   # the gradients' largest total norm per step (None: not clipped)
    weight_decay: float = 5e-5
    warmup: float = 0.1
    norms: str = "train"
    features: str = "through"  # "through": fusion last compares the through part only; "all": every channel


DEFAULT_RECIPE = Recipe()


@dataclass
class EpochRecord:
    """One epoch: mean losses, validation top-1 (None without val data), throughput."""

    epoch: int
    loss: float
    ce: float | None
    kd: float | None
    feature: float | None
    val_top1: float | None
    images: int
    seconds: float
    images_per_s: float
    lr: float


@dataclass
class FinetuneRun:
    """The record of a run, kept on the model (``model.meta["cspify.finetune"]``)."""

    recipe: dict
    settings: dict
    world_size: int = 1
    device: str = "cpu"
    epochs: list[EpochRecord] = field(default_factory=list)
    val_top1_before: float | None = None
    kept: str = ""                      # which model the run hands back: "epoch N", or "before fine-tuning"
    kept_top1: float | None = None      # its validation top-1

    @property
    def worse(self) -> bool:
        """Whether fine-tuning ended below where it started, on the validation images."""
        last = self.epochs[-1].val_top1 if self.epochs else None
        return last is not None and self.val_top1_before is not None and last < self.val_top1_before

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneRun:
        data = dict(data)
        data["epochs"] = [EpochRecord(**e) for e in data.get("epochs", [])]
        return cls(**data)


def finetune(
    converted: nn.Module,
    train_data,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    val_data=None,
    lr: float | None = None,
    batch_size: int = 128,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    feature_weight: float = 1.0,
    temperature: float = 4.0,
    use_labels: bool = True,
    recipe: Recipe = DEFAULT_RECIPE,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    keep: str = "best",
    max_steps: int | None = None,
) -> nn.Module:
    """Train ``converted`` (made by ``cspify.convert``) for ``epochs`` on ``train_data``, with
    distillation from ``teacher`` (the original model) where one is given; returns it.
    Any other model trains too, with the same recipe, on cross-entropy and logit
    distillation (it has no converted stage to distil).

    ``max_steps`` ends the run after that many optimiser steps (the schedule fits them), for
    a short run: the epoch it stops in is recorded with the images it saw.

    ``keep`` is "best" (with ``val_data``: hand back the model that scored best on it, the
    one before fine-tuning included, so a run never ends below where it started) or "last"
    (the last epoch's weights); the run's record says which (``kept``, ``kept_top1``).

    ``train_data`` is a Dataset or DataLoader of (inputs, labels) or of inputs alone, or
    any re-iterable of such batches. ``lr`` overrides the recipe's (already scaled) rate.
    The run's record is left at ``converted.meta["cspify.finetune"]`` (on the scoped
    submodule for a ``scope`` conversion) and written into every checkpoint.
    """
    if keep not in ("best", "last"):
        raise ConfigError(f"keep is 'best' or 'last', not {keep!r}.", "keep='best' hands back the best epoch on val_data")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be at least 1 (got {max_steps}).", "give a positive number of steps")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch size must be at least 1 (got {epochs} and {batch_size}).", "give positive numbers")
    if recipe.norms not in ("train", "frozen") or recipe.optimizer not in ("sgd", "adamw") or \
            recipe.features not in ("through", "all") or recipe.lr_scaling not in ("linear", "sqrt", "none"):
        raise ConfigError(f"unknown recipe {recipe}.",
                          "optimizer is 'sgd' or 'adamw', norms 'train' or 'frozen', features 'through' or 'all'")
    device = _device(device)
    init_distributed(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:  # the conversion, then the parts converted inside modules tracing kept whole (cspify.parts)
        conversions = find_conversions(converted)
    except ConfigError:  # a model cspify did not make: cross-entropy and logit distillation only
        conversions = []
    record = conversions[0][1] if conversions else None
    converted.to(device)
    source = batch_source(train_data, batch_size, num_workers)
    loader = _loader(source, seed, rank, world)
    first = split_batch(next(iter(loader)))[0]
    teacher_model, teacher_parts = None, []
    if teacher is not None and record is not None:
        teacher_model, teacher_parts = traced_originals(teacher, first[:1].to(device_of(teacher)), conversions, device)
    elif teacher is not None:
        teacher_model = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    # Each converted stage's output, in the graph that holds it: (name, student graph, teacher
    # graph, stage). Fusion last: the bypass channels carry x0' by construction, where the
    # original has its stage output; distilling them would pull the base layer away from what
    # the through part needs. The through channels are the partial transition's to match.
    distilled = [(f"{scope}:{s.name}" if i else s.name, converted.get_submodule(scope) if scope else converted, t, s)
                 for i, ((scope, rec), t) in enumerate(zip(conversions, teacher_parts)) if feature_weight > 0
                 for s in rec.converted if s.converted_output and s.output]
    through_only = recipe.features == "through" and record is not None and record.config.fusion == "last"
    starts = [_through_part(mine, s) if through_only else None for _, mine, _, s in distilled]

    steps_per_epoch = _length(loader)
    global_batch = source.batch_size * world
    rate = lr if lr is not None else recipe.lr * _batch_factor(recipe, global_batch)
    optimizer = _optimizer(converted, recipe, rate)
    total = max(1, steps_per_epoch * epochs) if steps_per_epoch else max_steps
    if total is not None and max_steps is not None:
        total = min(total, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, recipe.warmup))
    run = FinetuneRun(
        recipe=asdict(recipe) | {"lr": rate},
        settings=dict(epochs=epochs, batch_size=batch_size, global_batch=global_batch, ce_weight=ce_weight,
                      kd_weight=kd_weight if teacher is not None else 0.0,
                      feature_weight=feature_weight if teacher is not None else 0.0, temperature=temperature,
                      use_labels=use_labels, bf16=bf16, seed=seed, stages=[name for name, *_ in distilled]),
        world_size=world, device=str(device),
    )
    start_epoch = 0
    if resume is not None:
        start_epoch, saved = checkpoints.load(resume, converted, optimizer, scheduler)
        settings = run.settings | {"resumed_from": str(resume), "resumed_at_epoch": start_epoch}
        run = FinetuneRun.from_dict(saved)
        run.settings = settings
    else:
        torch.manual_seed(seed)
        random.seed(seed)
    model = converted
    if world > 1:
        model = nn.parallel.DistributedDataParallel(converted, device_ids=[device.index] if device.type == "cuda" else None)
    if run.val_top1_before is None and val_data is not None and start_epoch == 0:
        run.val_top1_before = evaluate(converted, val_data, device, batch_size=max(batch_size, 256))
    leave_step_record(converted, FINETUNE_KEY, run)
    start_top1 = run.val_top1_before if start_epoch == 0 else (run.epochs[-1].val_top1 if run.epochs else None)
    best = _Best(start_top1, "before fine-tuning" if start_epoch == 0 else f"epoch {start_epoch}", converted)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    try:
        with ExitStack() as stack:
            graphs = {id(g): g for _, mine, theirs, _ in distilled for g in (mine, theirs)}
            wanted = {key: [] for key in graphs}
            for _, mine, theirs, s in distilled:
                wanted[id(mine)].append(s.converted_output)
                wanted[id(theirs)].append(s.output)
            students = {id(mine) for _, mine, _, _ in distilled}
            values = {key: stack.enter_context(tapping(graphs[key], names, detach=key not in students))
                      for key, names in wanted.items()}
            steps = 0  # this call's optimiser steps, against max_steps
            for epoch in range(start_epoch, epochs):
                if max_steps is not None and steps >= max_steps:
                    break
                if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                    loader.sampler.set_epoch(epoch)
                _train_mode(converted, recipe.norms)
                sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "feature": 0.0}
                counts = {"ce": 0, "kd": 0, "feature": 0}
                seen, began = 0, time.perf_counter()
                bar = _progress(steps_per_epoch, epoch, epochs, progress and rank == 0)
                for batch in loader:
                    if max_steps is not None and steps >= max_steps:
                        break
                    steps += 1
                    x, y = split_batch(batch)
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True) if (y is not None and use_labels) else None
                    with autocast():
                        out = model(x)
                        logits = out if isinstance(out, torch.Tensor) else None
                        losses = {}
                        if y is not None and ce_weight > 0 and logits is not None:
                            losses["ce"] = F.cross_entropy(logits.float(), y)
                        if teacher_model is not None and (kd_weight > 0 or distilled):
                            with torch.no_grad():
                                target = teacher_model(x)
                            if kd_weight > 0 and logits is not None and isinstance(target, torch.Tensor):
                                losses["kd"] = _kd_loss(logits.float(), target.float(), temperature)
                            if distilled:
                                losses["feature"] = sum(
                                    _feature_loss(values[id(mine)][s.converted_output], values[id(theirs)][s.output], start)
                                    for (_, mine, theirs, s), start in zip(distilled, starts)
                                ) / len(distilled)
                    if not losses:
                        raise ConfigError(
                            "there is nothing to train on: no labels and no teacher.",
                            "give a teacher (the original model) to distil from, or data with labels",
                        )
                    weights = {"ce": ce_weight, "kd": kd_weight, "feature": feature_weight}
                    loss = sum(weights[k] * v for k, v in losses.items())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.clip is not None:
                        nn.utils.clip_grad_norm_(converted.parameters(), recipe.clip)
                    optimizer.step()
                    scheduler.step()
                    n = len(x)
                    seen += n
                    sums["loss"] += float(loss.detach()) * n
                    for k, v in losses.items():
                        sums[k] += float(v.detach()) * n
                        counts[k] += n
                    if bar is not None:
                        rate_now = seen * world / max(time.perf_counter() - began, 1e-9)
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{rate_now:.0f}")
                        bar.update(1)
                if bar is not None:
                    bar.close()
                seconds = time.perf_counter() - began
                totals = _all_sum(torch.tensor([sums["loss"], sums["ce"], sums["kd"], sums["feature"], seen,
                                                counts["ce"], counts["kd"], counts["feature"]], dtype=torch.float64),
                                  device)
                images = int(totals[4])
                top1 = evaluate(converted, val_data, device, batch_size=max(batch_size, 256)) if val_data is not None else None
                run.epochs.append(EpochRecord(
                    epoch=epoch + 1, loss=round(float(totals[0]) / max(images, 1), 6),
                    ce=_mean(totals[1], totals[5]), kd=_mean(totals[2], totals[6]), feature=_mean(totals[3], totals[7]),
                    val_top1=top1, images=images, seconds=round(seconds, 3),
                    images_per_s=round(images / max(seconds, 1e-9), 1), lr=optimizer.param_groups[0]["lr"],
                ))
                if progress and rank == 0:
                    shown = f", val top-1 {100 * top1:.2f}%" if top1 is not None else ""
                    print(f"epoch {epoch + 1}/{epochs}: loss {run.epochs[-1].loss:.4f}{shown}", file=sys.stderr)
                best.offer(top1, f"epoch {epoch + 1}", converted)
                if checkpoint is not None:
                    checkpoints.save(checkpoint, converted, optimizer, scheduler, epoch + 1, run.to_dict(), rank)
    finally:
        converted.eval()
    last = run.epochs[-1] if run.epochs else None
    if keep == "best" and best.state is not None and last is not None and best.name != f"epoch {last.epoch}":
        converted.load_state_dict(best.state)  # every process holds the same scores, so the same choice
        run.kept, run.kept_top1 = best.name, best.top1
    elif last is not None:
        run.kept, run.kept_top1 = f"epoch {last.epoch}", last.val_top1
    return converted


class _Best:
    """The best model seen on the validation images: its score, its name, a copy of its state."""

    def __init__(self, top1: float | None, name: str, model: nn.Module) -> None:
        self.top1, self.name, self.state = None, "", None
        self.offer(top1, name, model)

    def offer(self, top1: float | None, name: str, model: nn.Module) -> None:
        if top1 is not None and (self.top1 is None or top1 > self.top1):
            self.top1, self.name = top1, name
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate(model: nn.Module, data, device: str | torch.device = "cpu", *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (a Dataset, a DataLoader or an iterable of
    (inputs, labels)), in eval mode without gradients. Under torch.distributed each process
    scores its share of a Dataset and the counts are summed."""
    device = _device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    source = batch_source(data, batch_size)
    shared = source.dataset is not None
    reader = source.loader(range(rank, len(source.dataset), world)) if shared else source.batches
    correct = total = 0
    with eval_mode(model):
        for batch in reader:
            x, y = split_batch(batch)
            if y is None:
                raise ConfigError("evaluate needs labels, and the data has none.", "give (inputs, labels) batches")
            out = model(x.to(device))
            correct += int((out.argmax(1) == y.to(device)).sum())
            total += len(y)
    if shared and world > 1:
        counts = _all_sum(torch.tensor([correct, total], dtype=torch.float64), device)
        correct, total = int(counts[0]), int(counts[1])
    return round(correct / max(total, 1), 6)


def init_distributed(device: torch.device | str = "cpu") -> bool:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA)
    when it is there and nobody has yet; True when running data-parallel."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = _device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- losses


def _kd_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target / t, 1), reduction="batchmean",
                    log_target=True) * t * t


def _through_part(gm, stage) -> tuple[int, int | tuple[int, ...]] | None:
    """(channel axis, bypass width) of a fusion-last stage output, or (axis, the through
    channels' positions) where each channel kept its place: the concat's axis, which is
    not 1 for a channels-last stream; None where the output is no concat."""
    node = next((uncast(n) for n in gm.graph.nodes if n.name == stage.converted_output), None)
    if node is None or node.op != "call_function" or node.target is not torch.cat:
        return None
    return cat_args(node)[1], stage.output_index if stage.output_index is not None else stage.bypass_channels


def _feature_loss(mine: torch.Tensor, theirs: torch.Tensor, through: tuple | None = None) -> torch.Tensor:
    """Mean squared error over the teacher feature's variance (scale-free across stages),
    on the through part ``(axis, bypass width or positions)`` where given."""
    if through is not None and isinstance(through[1], tuple):
        axis, index = through
        index = torch.tensor(index, device=mine.device)
        mine, theirs = mine.index_select(axis, index), theirs.index_select(axis, index)
    elif through is not None:
        axis, start = through
        width = mine.shape[axis] - start
        mine, theirs = mine.narrow(axis, start, width), theirs.narrow(axis, start, width)
    theirs = theirs.float()
    return F.mse_loss(mine.float(), theirs) / theirs.var().clamp_min(1e-6)


# ---------------------------------------------------------------- data


def _loader(source, seed, rank, world):
    """The training batches of this process, reshuffled per epoch deterministically (seed +
    epoch): a Dataset by a DistributedSampler, batches as they come sharded by rank."""
    if source.dataset is not None:
        if len(source.dataset) == 0:
            raise ConfigError("the training data is empty.", "give at least one batch of images")
        sampler = DistributedSampler(source.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=False)
        return source.loader(sampler=sampler)
    if source.once:
        raise ConfigError(
            "the training data is a one-shot iterator, which cannot be read again each epoch.",
            "give a Dataset, a DataLoader or a list of batches",
        )
    return _Shard(source.batches, rank, world) if world > 1 and not source.shards_itself else source.batches


class _Shard:
    """Every ``world``-th batch of a re-iterable, starting at ``rank``."""

    def __init__(self, data, rank, world):
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i % self.world == self.rank:
                yield batch


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


# ---------------------------------------------------------------- optimisation


def _optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (one-dimensional parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def _batch_factor(recipe: Recipe, global_batch: int) -> float:
    """How the recipe's rate for ``lr_batch`` images changes at ``global_batch``."""
    ratio = global_batch / recipe.lr_batch
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[recipe.lr_scaling]


def _schedule(total: int | None, warmup: float):
    """Linear warm-up, then a cosine to zero, per step; constant when the length is unknown."""
    if total is None:
        return lambda step: 1.0
    warm = max(1, int(round(warmup * total)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _train_mode(model: nn.Module, norms: str) -> None:
    model.train()
    if norms == "frozen":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


# ---------------------------------------------------------------- small helpers


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU.", "use --device cpu")
    return device


def _all_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        moved = values.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(moved)
        return moved.cpu()
    return values


def _mean(total, count) -> float | None:
    return round(float(total) / float(count), 6) if float(count) > 0 else None


def _progress(steps, epoch, epochs, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)
