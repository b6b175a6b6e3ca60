"""``cspify sweep``: convert MODEL at every gamma, fusion and hidden given; one table.

    cspify sweep torchvision:resnet50 --gammas 0.25,0.5,0.75 --fusion last,first --plot sweep.png
    cspify sweep model.py --weights trained.pt --data fashion-mnist --finetune-epochs 1 --plot pareto.png

Its options are convert's, except that --gammas, --fusion and --hidden take lists (and
there is no --seed: every point is converted with the default one).
"""

from __future__ import annotations

import click

from cspify.cli.exits import guard
from cspify.cli.options import (
    MODEL_HELP,
    batch_sizes,
    check_options,
    data_options,
    model_options,
    output_options,
    plot_option,
    stage_options,
)
from cspify.cli.run import Progress, data_step, echo_saved, load_model_step, normalised_step, report_files, stage_reports
from cspify.data import check_fits, parse_normalisation
from cspify.config import FUSIONS, HIDDEN, CSPConfig
from cspify.errors import ConfigError
from cspify.files import Outputs


@click.command(help=f"Convert MODEL at every gamma, fusion and hidden given; one table of the savings.\n\n{MODEL_HELP}")
@click.option("--gammas", default="0.25,0.5,0.75", show_default=True, metavar="G1,G2", help="Bypass fractions to try.")
@click.option("--fusion", "fusions", default="last", show_default=True, metavar="last,first", help="Fusions to try.")
@click.option("--hidden", "hiddens", default="keep", show_default=True, metavar="keep,scale", help="Inner widths to try.")
@click.option("--round-to", default="1", show_default=True, metavar="N",
              help="Round every narrowed width to a multiple of N channels, at every point.")
@stage_options
@model_options
@click.option("--latency", is_flag=True, help="Also time every point against the original (slow).")
@click.option("--batch-sizes", "sizes", default="1", show_default=True, metavar="B1,B2", help="Batch sizes for --latency.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for --latency.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to time.")
@click.option("--min-run-time", type=float, default=1.0, show_default=True, help="Seconds of timing per model and round.")
@data_options("what a timm or torchvision model says", required=False,
              what="Calibrate each point on its training images and score it on its validation images: top-1, and "
                   "agreement with the original.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --data: distil each point from the original for this many epochs after calibrating it.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=2048, show_default=True,
              help="With --data: training images each point's calibration reads.")
@output_options("sweep")
@plot_option("Draw flops (and latency) against gamma, in the format the suffix names (.png, .jpg, .pdf, .svg, ...).")
def sweep(gammas, fusions, hiddens, round_to, latency, sizes, threads, device, min_run_time, finetune_epochs,
          calibration_images, **options) -> None:
    with guard(options["debug"]):
        from cspify.sweep import sweep as run_sweep

        gamma_values = tuple(CSPConfig(g.strip()).gamma for g in gammas.split(",") if g.strip())
        if not gamma_values:
            raise ConfigError(f"--gammas {gammas!r} names no gamma.", "write them as --gammas 0.25,0.5,0.75")
        fusion_values, hidden_values = _words(fusions, FUSIONS, "fusion"), _words(hiddens, HIDDEN, "hidden")
        round_to = CSPConfig(round_to=round_to).round_to
        sizes = batch_sizes(sizes)
        check_options(options)
        if not options["data_path"] and (finetune_epochs or any(options[k] is not None for k in ("mean", "std",
                                                                                                  "channels"))):
            raise ConfigError("--finetune-epochs, --mean, --std and --channels say how to use the images of --data, "
                              "and there is none.", "add --data DATA, or drop them")
        given = parse_normalisation(options["mean"], options["std"])  # before any long work
        progress = Progress(options["quiet"])
        data = None
        if options["data_path"]:
            data = data_step(options["data_path"], progress, int(options["channels"]) if options["channels"] else None)
            if options["input_shape"] is None:
                options = dict(options, input_shape=",".join(map(str, (1, data.channels, *data.size))))
        loaded = load_model_step(options, progress)
        if data is not None:
            said = (loaded.mean, loaded.std) if loaded.mean is not None else None
            data = normalised_step(data, given, said, loaded.normalisation_from, not options["quiet"])
            check_fits(loaded.model, data, options["model"])
        result = run_sweep(
            loaded.model, loaded.example_inputs, gamma_values, fusion_values, hidden_values,
            stages=options["stages"] or None, allow_costlier=options["allow_costlier"], kinds=options["kinds"],
            round_to=round_to, scope=options["scope"],
            leaf_modules=options["leaves"], latency=latency, batch_sizes=sizes, threads=threads, device=device,
            min_run_time=min_run_time, progress=not options["quiet"], data=data, finetune_epochs=finetune_epochs,
            calibration_images=calibration_images,
        )
        if not result.points:  # stopped before the first point: nothing to write
            raise result.stopped
        with Outputs(force=options["force"]) as out:  # all written, or none
            stage_reports(out, options, result, plot=lambda sweep, f: _plot(sweep, f, options["plot_path"]))
        click.echo(str(result))
        echo_saved(report_files(options, "sweep", plot="the plot of top-1 against flops" if data is not None
                                else "the plot of flops against gamma"))
        if result.stopped is not None:  # the points done are written; the stop still ends the command as one
            raise result.stopped


def _words(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    wrong = [v for v in values if v not in allowed]
    if not values or wrong:
        raise ConfigError(f"--{option} takes {' or '.join(allowed)}, got {text!r}.",
                          f"for example --{option} {','.join(allowed)}")
    return values


def _plot(result, f, path: str) -> None:
    from cspify.plot import plot_format, plot_sweep  # matplotlib loads only when a plot is asked for

    plot_sweep(result, f, plot_format(path))
