"""``cspify evaluate``: the top-1 of a saved model on DATA's validation images.

    cspify evaluate csp.pt --data /usr/share/datasets/fashion-mnist
    cspify evaluate csp.pt --data photos --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --json top1.json

The images are normalised as ``--mean/--std`` say, else as the model was fitted on (what
``cspify finetune`` kept at ``meta["cspify.inputs"]``), else not at all; the choice is printed.
"""

from __future__ import annotations

import json

import click
import torch
import torch.nn as nn

from cspify.cli.exits import guard
from cspify.cli.options import check_writable, data_options
from cspify.cli.run import Progress, data_step, normalised_step
from cspify.data import check_fits, parse_normalisation
from cspify.errors import LoadError
from cspify.files import Outputs
from cspify.finetune import evaluate
from cspify.record import INPUTS_KEY, step_record


@click.command("evaluate", help="Score a saved model (a file torch.save wrote, as cspify convert -o and cspify "
                                "finetune -o do) on DATA's validation images: its top-1.")
@click.argument("saved", metavar="MODEL.pt", type=click.Path(dir_okay=False))
@data_options("what the model was fitted on")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per forward.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the score as JSON.")
@click.option("--force", is_flag=True, help="Overwrite output files that exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def evaluate_command(**options) -> None:
    with guard(options["debug"]):
        _evaluate(options)


def _evaluate(options: dict) -> None:
    given = parse_normalisation(options["mean"], options["std"])  # before any long work
    if options["json_path"]:
        check_writable(options["json_path"], options["force"])
    progress = Progress(options["quiet"])
    path = options["saved"]
    with progress(f"loading {path}"):
        model = load_saved(path)
    data = data_step(options["data_path"], progress, int(options["channels"]) if options["channels"] else None)
    stored = step_record(model, INPUTS_KEY)
    said = (tuple(stored["mean"]), tuple(stored["std"])) if stored else None
    data = normalised_step(data, given, said, "what the model was fitted on", not options["quiet"])
    check_fits(model, data, path)
    device = torch.device(options["device"])
    with progress(f"scoring on {len(data.val)} validation images"):
        top1 = evaluate(model.to(device), data.val, device, batch_size=options["batch_size"])
    if options["json_path"]:
        record = {"model": path, "data": data.summary(), "top1": top1}
        with Outputs(force=options["force"]) as out:
            out.file(options["json_path"], lambda f: json.dump(record, f, indent=2))
    click.echo(f"top-1 (val) {100 * top1:.2f}% on {len(data.val)} images of {data.source}")


def load_saved(path: str) -> nn.Module:
    """The whole module a file holds (torch.load with weights_only=False: only files you trust)."""
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise LoadError(f"the model file {path!r} does not exist.", "give the file cspify convert -o or finetune -o wrote") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise LoadError(f"cannot read the model file {path!r}: {first}.",
                        "give a file torch.save wrote of a whole module (cspify convert -o, cspify finetune -o)") from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"{path!r} holds a {type(model).__name__}, not a whole model.",
                        "give a file torch.save(model) wrote; a state_dict needs its model: use --weights with convert")
    return model.eval()
