"""``cspify finetune``: convert MODEL, calibrate it, fine-tune it with distillation from MODEL,
and print both models' accuracy and flops side by side.

    cspify finetune model.py --weights trained.pt --data /usr/share/datasets/fashion-mnist \\
        --epochs 1 -o csp.pt --json run.json
    torchrun --nproc_per_node 2 -m cspify finetune model.py --data DATA -o csp.pt   # data-parallel

A checkpoint is written after every epoch (``--checkpoint``, by default OUT.ckpt beside
``-o``); Ctrl-C or SIGTERM leaves the last complete one, and ``--resume CKPT`` continues from
it. Bad data (a missing folder, no images, more classes than the model has outputs, a
channel count the model does not take) is one ``error:`` line and exit code 7.
The work is ``cspify.recover``; this file parses its options and prints its record.
"""

from __future__ import annotations

import os

import click
import torch
import torch.distributed as dist

from cspify.cli.exits import guard
from cspify.cli.options import (
    MODEL_HELP,
    check_options,
    check_writable,
    config_from,
    data_options,
    model_options,
    point_options,
    stage_options,
)
from cspify.cli.run import Progress, data_step, load_model_step, normalised_step, stage_reports
from cspify.data import parse_normalisation
from cspify.export import save_model
from cspify.files import Outputs
from cspify.finetune import init_distributed
from cspify.recovery import recover


@click.command("finetune", help=f"Convert MODEL, calibrate it on DATA, fine-tune it with distillation from MODEL, "
                    f"and compare accuracy and flops.\n\n{MODEL_HELP} DATA is a folder with train/<class>/* and "
                    f"val/<class>/* images, or the four MNIST-style IDX files.")
@model_options
@stage_options
@point_options
@data_options("what a timm or torchvision model says")
@click.option("--allow-chance", is_flag=True,
              help="Go on when the original scores near chance on the validation images (a model with random weights).")
@click.option("--epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="Epochs of fine-tuning (0: calibrate only, and score that).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per step (per process under torchrun).")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 0.02 at any batch and process count, SGD with Nesterov momentum].")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Save the model that scored best on the validation images (the calibrated one included), "
                   "or the last epoch's.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Train and calibrate on a seeded random part of the training images, for a short run.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="End fine-tuning after this many optimiser steps (the schedule fits them).")
@click.option("--no-labels", is_flag=True, help="Distil only: do not use the labels.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Training images calibration reads (no labels).")
@click.option("--no-calibrate", is_flag=True, help="Fine-tune from the converted model as it is.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to train.")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast while training.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Save the fine-tuned model (torch.save of the whole module; torch.load(PATH, weights_only=False)).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint written after every epoch [default: OUTPUT.ckpt].")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, metavar="CKPT",
              help="Continue a run from its checkpoint (the same MODEL, options and DATA).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the run's record as JSON.")
@click.option("--force", is_flag=True, help="Overwrite output files that exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines or bars on stderr.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def finetune_command(**options) -> None:
    with guard(options["debug"]):
        _finetune(options)


def _finetune(options: dict) -> None:
    device = torch.device(options["device"])
    parallel = init_distributed(device)
    lead = not parallel or dist.get_rank() == 0
    checkpoint = options["checkpoint"] or f"{options['output']}.ckpt"
    if lead:
        check_options(options, options["output"], options["json_path"])
        if options["resume"] is None or options["resume"] != checkpoint:
            check_writable(checkpoint, True)  # overwritten every epoch: only its folder must take it
    given = parse_normalisation(options["mean"], options["std"])  # before any long work
    progress = Progress(options["quiet"] or not lead)
    data = data_step(options["data_path"], progress, int(options["channels"]) if options["channels"] else None)
    if options["input_shape"] is None:
        options = dict(options, input_shape=",".join(map(str, (1, data.channels, *data.size))))
    loaded = load_model_step(options, progress)
    said = (loaded.mean, loaded.std) if loaded.mean is not None else None
    data = normalised_step(data, given, said, loaded.normalisation_from, lead and not options["quiet"])
    data = data.fraction(options["fraction"], options["seed"])
    try:
        done = recover(loaded.model, loaded.example_inputs, data, config=config_from(options), scope=options["scope"],
                       leaf_modules=options["leaves"], seed=options["seed"],
                       calibration_images=None if options["no_calibrate"] else options["calibration_images"],
                       epochs=options["epochs"], batch_size=options["batch_size"], lr=options["lr"],
                       use_labels=not options["no_labels"], device=device, bf16=options["bf16"],
                       checkpoint=checkpoint, resume=options["resume"], num_workers=options["workers"],
                       progress=lead and not options["quiet"], steps=progress, name=options["model"],
                       allow_chance=options["allow_chance"], keep=options["keep"],
                       max_steps=options["max_steps"])
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as guard() turns it into one
        if lead and getattr(stop, "completed", 0):  # stopped while fine-tuning, after an epoch
            click.echo(f"cspify: the {stop.completed} epoch(s) completed before the stop are in {checkpoint}; "
                       f"continue with --resume {checkpoint}", err=True)
        elif lead and getattr(stop, "checkpoint", None):
            click.echo("cspify: stopped before the first epoch completed; no checkpoint was written", err=True)
        raise
    if lead:
        with Outputs(force=options["force"]) as out:  # all written, or none
            out.path(options["output"], lambda tmp: save_model(done.csp, tmp), suffix=".pt")  # loads without cspify
            stage_reports(out, options, done)
        click.echo(str(done))
        run = done.run
        if run is not None and run.worse:
            click.echo(f"\nwarning: fine-tuning ended at {100 * run.epochs[-1].val_top1:.2f}% top-1, below the "
                       f"{100 * run.val_top1_before:.2f}% it started from; the model saved is "
                       f"{'the one before fine-tuning' if run.kept == 'before fine-tuning' else 'that of ' + run.kept} "
                       f"({100 * run.kept_top1:.2f}%)" + ("" if options["keep"] == "best" else " (--keep last)"), err=True)
        click.echo(f"\nsaved the fine-tuned model to {options['output']}")
        if done.run is not None and os.path.exists(checkpoint):
            click.echo(f"{checkpoint} stays so that --resume can extend the run with more epochs; delete it when done")
    if parallel:
        dist.destroy_process_group()

