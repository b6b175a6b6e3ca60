"""Fine-tuning checkpoints: written atomically on rank 0 after each epoch, read back to
resume exactly (weights, optimiser, schedule, random states, the run so far).

    save(path, model, optimizer, scheduler, epoch, run.to_dict(), rank)
    epoch, run = load(path, model, optimizer, scheduler)   # into the same conversion, or refused

A checkpoint remembers which channels each converted stage runs through: one made with
other channels (the split by importance on other images) is refused, since its weights,
of the same shapes, would read the wrong channels.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn as nn

from cspify.errors import ConfigError
from cspify.files import atomic_file
from cspify.record import find_conversion

FORMAT = "cspify.finetune/1"


def save(path, model: nn.Module, optimizer, scheduler, epoch: int, run: dict, rank: int) -> None:
    """Write atomically on rank 0 (``cspify.files.atomic_file``): a temporary file beside the
    target, renamed into place."""
    if rank == 0:
        state = {
            "format": FORMAT, "epoch": epoch, "model": model.state_dict(), "splits": splits(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "run": run,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        with atomic_file(path, name=f"the checkpoint {str(path)!r}", hint="choose a folder you can write to") as f:
            torch.save(state, f)
    if dist.is_initialized():
        dist.barrier()


def load(path, model: nn.Module, optimizer, scheduler) -> tuple[int, dict]:
    """Restore everything ``save`` wrote; (the epoch it was written after, the run's dict)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"the checkpoint {str(path)!r} does not exist.", "give a file a previous run wrote") from None
    except Exception as exc:
        raise ConfigError(f"cannot read the checkpoint {str(path)!r}: {exc}.",
                          "give a file cspify finetune wrote (checkpoint=)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a cspify fine-tuning checkpoint.", "give a file cspify finetune wrote")
    if state.get("splits", splits(model)) != splits(model):
        raise ConfigError("the checkpoint's stages run other channels through than this conversion's, so its "
                          "weights would read the wrong channels.",
                          "resume with the model converted on the same images and options as the first run")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"the checkpoint does not fit this model ({first}).",
                          "resume with the model converted with the same options as the first run") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["epoch"]), state["run"]


def splits(model: nn.Module) -> dict[str, list[int]]:
    """The base channels each converted stage runs through, where not the last ones."""
    _, record = find_conversion(model)
    return {s.name: list(s.through_index) for s in record.converted if s.through_index is not None}


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
