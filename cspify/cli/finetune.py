"""``cspify finetune``: convert MODEL, calibrate it, fine-tune it with distillation from MODEL,
and print both models' accuracy and flops side by side.

    cspify finetune model.py --weights trained.pt --data /usr/share/datasets/fashion-mnist \\
        --epochs 1 -o csp.pt --json run.json
    torchrun --nproc_per_node 2 -m cspify finetune model.py --data DATA -o csp.pt   # data-parallel

A checkpoint is written after every epoch (``--checkpoint``, by default OUT.ckpt beside
``-o``); Ctrl-C or SIGTERM leaves the last complete one, and ``--resume CKPT`` continues from
it. Bad data (a missing folder, no images, more classes than the model has outputs, a
channel count the model does not take) is one ``error:`` line and exit code 7.
``calibrate_data`` is what ``cspify convert --calibrate DATA`` runs.
"""

from __future__ import annotations

import json

import click
import torch
import torch.distributed as dist
import torch.nn as nn

from cspify import api
from cspify.cli.common import (
    MODEL_HELP,
    Progress,
    calibrate_step,
    check_fits,
    check_options,
    check_writable,
    config_from,
    data_step,
    guard,
    load_model_step,
    model_options,
    point_options,
    stage_options,
)
from cspify.export import Outputs
from cspify.finetune import Recipe, evaluate, finetune, init_distributed


@click.command("finetune", help=f"Convert MODEL, calibrate it on DATA, fine-tune it with distillation from MODEL, "
                    f"and compare accuracy and flops.\n\n{MODEL_HELP} DATA is a folder with train/<class>/* and "
                    f"val/<class>/* images, or the four MNIST-style IDX files.")
@model_options
@stage_options
@point_options
@click.option("--data", "data_path", required=True, metavar="DATA", help="The images: an ImageFolder tree or IDX files.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Read the images with this many channels (grey as RGB repeats the channel).")
@click.option("--epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="Epochs of fine-tuning (0: calibrate only, and score that).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per step (per process under torchrun).")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 0.02 per 128 images of global batch, SGD with Nesterov momentum].")
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
    progress = Progress(options["quiet"] or not lead)
    data = data_step(options["data_path"], progress, int(options["channels"]) if options["channels"] else None)
    if options["input_shape"] is None:
        options = dict(options, input_shape=",".join(map(str, (1, data.channels, *data.size))))
    loaded = load_model_step(options, progress)
    model = loaded.model
    check_fits(model, data, options["model"])
    with progress("tracing and converting"):
        csp = api.convert(model, loaded.example_inputs, config=config_from(options), scope=options["scope"],
                          leaf_modules=options["leaves"], seed=options["seed"])
    with progress("counting flops"):
        report = api.compare(model, csp, loaded.example_inputs, scope=options["scope"], leaf_modules=options["leaves"])
    model.to(device), csp.to(device)
    with progress("scoring the original on the validation images"):
        original_top1 = evaluate(model, data.val, device)
    if not options["no_calibrate"] and options["resume"] is None:
        calibrate_step(model, csp, data, options["calibration_images"], progress)
    try:
        if options["epochs"]:
            finetune(csp, data.train, teacher=model, epochs=options["epochs"], val_data=data.val, lr=options["lr"],
                     batch_size=options["batch_size"], use_labels=not options["no_labels"], recipe=Recipe(),
                     device=device, bf16=options["bf16"], checkpoint=checkpoint, resume=options["resume"],
                     progress=lead and not options["quiet"], seed=options["seed"], num_workers=options["workers"])
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as guard() turns it into one
        if lead:
            click.echo(f"cspify: epochs completed before the stop are in {checkpoint}; "
                       f"continue with --resume {checkpoint}", err=True)
        raise
    run = _run_record(csp, options["scope"])
    if run is None:  # --epochs 0
        with progress("scoring the converted model"):
            before = after = evaluate(csp, data.val, device)
    else:  # finetune scored it before its first epoch (a resumed run kept that score)
        before, after = run.val_top1_before, run.epochs[-1].val_top1 if run.epochs else None
    record = {
        "data": data.summary(),
        "original": {"top1": original_top1, "flops": report.original.flops, "params": report.original.params},
        "converted": {"top1_before_finetune": before, "top1": after, "flops": report.converted.flops,
                      "params": report.converted.params},
        "conversion": report.to_dict(),
        "calibration": _calibration_record(csp, options["scope"]),
        "finetune": run.to_dict() if run is not None else None,
    }
    if lead:
        with Outputs(force=options["force"]) as out:  # all written, or none
            out.file(options["output"], lambda f: torch.save(csp, f), binary=True)
            if options["json_path"]:
                out.file(options["json_path"], lambda f: json.dump(record, f, indent=2))
        click.echo(side_by_side(record))
        click.echo(f"\nsaved the fine-tuned model to {options['output']}")
    if parallel:
        dist.destroy_process_group()


def side_by_side(record: dict) -> str:
    """Top-1, flops and params of the original and the converted model, as a table."""
    from tabulate import tabulate

    from cspify.report import human

    o, c = record["original"], record["converted"]
    rows = [
        ["top-1 (val)", _percent(o["top1"]), _percent(c["top1"]),
         f"{100 * (c['top1'] - o['top1']):+.2f} pts" if c["top1"] is not None else ""],
        ["  before fine-tuning", "", _percent(c["top1_before_finetune"]), ""],
        ["flops", human(o["flops"]), human(c["flops"]), f"{100 * (1 - c['flops'] / o['flops']):.1f}% saved"],
        ["params", human(o["params"]), human(c["params"]), f"{100 * (1 - c['params'] / o['params']):.1f}% saved"],
    ]
    return tabulate(rows, headers=["", "original", "converted", "change"], disable_numparse=True)


def _percent(value: float | None) -> str:
    return f"{100 * value:.2f}%" if value is not None else "-"


def _run_record(csp: nn.Module, scope: str | None):
    from cspify.finetune import META_KEY

    return (csp.get_submodule(scope) if scope else csp).meta.get(META_KEY)


def _calibration_record(csp: nn.Module, scope: str | None):
    from cspify.calibrate import META_KEY

    found = (csp.get_submodule(scope) if scope else csp).meta.get(META_KEY)
    return found.to_dict() if found is not None else None
