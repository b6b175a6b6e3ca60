"""The steps commands run, each with its progress line: load MODEL, convert and measure it,
open DATA and calibrate on it, and stage the report files.

    progress = Progress(options["quiet"])    # "cspify: loading model.py ... 0.4s" on stderr
    done = load_convert_measure(options, progress)
    with Outputs(force=options["force"]) as out:    # cspify.files: every file, all written or none
        stage_reports(out, options, done.report)    # --json, --markdown, --plot

``options`` is the dict click passes, with the keys ``cli.options`` declares.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import click
import torch.nn as nn

from cspify import api
from cspify.budget import Goal, Search
from cspify.cli.options import config_from, goal_from
from cspify.data import ImageData, check_fits, open_data, parse_normalisation
from cspify.files import Outputs
from cspify.load import Loaded, load_model, parse_shape
from cspify.recovery import calibrate_on
from cspify.record import INPUTS_KEY, leave_step_record
from cspify.report import Report


class Progress:
    """One line per step on stderr, with its time, so long work is never silent.

        progress = Progress(quiet=False)
        with progress("loading model.py"):    # "cspify: loading model.py ... 0.4s" (or "... failed")
            ...
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextmanager
    def __call__(self, what: str):
        start = time.perf_counter()
        if not self.quiet:
            click.echo(f"cspify: {what} ...", err=True, nl=False)
        try:
            yield
        except BaseException:
            if not self.quiet:
                click.echo(" failed", err=True)
            raise
        if not self.quiet:
            click.echo(f" {time.perf_counter() - start:.1f}s", err=True)


@dataclass(frozen=True)
class Converted:
    """What the load-convert-measure step gives a command."""

    model: nn.Module          # the original, as loaded (with --weights)
    inputs: tuple             # its example inputs
    csp: nn.Module            # the converted model
    report: Report            # both models measured
    loaded: Loaded | None = None  # what loading said besides (the input normalisation a zoo model carries)
    data: ImageData | None = None  # the images the conversion measured its split on (convert --calibrate)


def load_model_step(options: dict, progress: Progress) -> Loaded:
    """MODEL (with --weights, --input-shape) as a module and example inputs, with its progress line."""
    shape = parse_shape(options["input_shape"]) if options["input_shape"] is not None else None
    weights = options["weights"]
    with progress(f"loading {options['model']}" + (f" with weights {weights}" if weights else "")):
        return load_model(options["model"], shape, weights=weights)


def load_convert_measure(options: dict, progress: Progress, measuring: str = "measuring both models",
                         search: Search | None = None, refuse_none: bool = True,
                         images: Callable[[Loaded], ImageData] | None = None) -> Converted:
    """Load MODEL, convert it with the options, measure both: one progress line per step.
    ``search``: how a budget or the latency objective times stages (``bench`` times them as
    it times the models); ``refuse_none=False``: a model with nothing to convert is measured
    as it is, its report saying why (``analyze``); ``images``: the images, read once MODEL
    is loaded, that the split by importance measures (``calibration_data``)."""
    config, goal = config_from(options), goal_from(options)
    loaded = load_model_step(options, progress)
    data = images(loaded) if images is not None else None
    measured = data is not None and config.split == "importance"
    judged = data is not None and goal.target_flops is not None and goal.objective == "flops"
    doing = _choosing(goal, judged) if goal.active else "tracing and converting"
    with progress(doing + (" (measuring the split on the images)" if measured else "")):
        csp = api.convert(loaded.model, loaded.example_inputs, config=config, scope=options["scope"],
                          leaf_modules=options["leaves"], seed=options["seed"], objective=goal.objective,
                          target_flops=goal.target_flops, target_latency=goal.target_latency,
                          search=search if goal.active else None, refuse_none=refuse_none,
                          data=data.train if data is not None else None)
    with progress(measuring):
        report = api.compare(loaded.model, csp, loaded.example_inputs, scope=options["scope"],
                             leaf_modules=options["leaves"])
    return Converted(loaded.model, loaded.example_inputs, csp, report, loaded, data)


def _choosing(goal: Goal, judged: bool = False) -> str:
    """The progress line of a conversion a goal chooses (it converts, measures or times many times)."""
    what = [f"{what} {value:g}" for what, value in goal.targets] or ["the stages that pay"]
    how = ("timing each stage" if goal.timed else
           "calibrating and judging every stage at each option on the images" if judged else
           "measuring every stage at each option")
    return f"choosing stages for {' and '.join(what)} by {goal.objective} ({how})"


def data_step(path: str, progress: Progress, channels: int | None = None) -> ImageData:
    """DATA opened, with its progress line."""
    with progress(f"reading {path}"):
        return open_data(path, channels=channels)


def normalised_step(data: ImageData, given, said, said_by: str, say: bool) -> ImageData:
    """DATA normalised as --mean/--std say (``given``, as ``parse_normalisation`` returns it),
    else as the model says (``said``: mean and std, read from ``said_by``), else not at all;
    the choice said on stderr."""
    if given is not None:
        data, where = data.normalised(*given), "--mean/--std"
    elif said is not None:
        data, where = data.normalised(*said), said_by
    else:
        where = "the default: the model says nothing"
    if say:
        click.echo(f"cspify: input normalisation {data.normalisation} ({where})", err=True)
    return data


def calibration_data(path: str, loaded: Loaded, options: dict, progress: Progress) -> ImageData:
    """``cspify convert --calibrate DATA``: DATA opened, normalised as --mean/--std or the
    model say, and checked to fit MODEL."""
    given = parse_normalisation(options["mean"], options["std"])
    data = data_step(path, progress)
    said = (loaded.mean, loaded.std) if loaded.mean is not None else None
    data = normalised_step(data, given, said, loaded.normalisation_from, not options["quiet"])
    check_fits(loaded.model, data, options["model"], classes=False)
    return data


def calibrate_data(done: Converted, progress: Progress, images: int = 2048) -> None:
    """Calibrate the converted model on ``done.data``; the normalisation is kept with the model."""
    data = done.data
    calibrate_on(done.model, done.csp, data, images, progress)
    leave_step_record(done.csp, INPUTS_KEY, {"mean": list(data.mean), "std": list(data.std)})


def stage_reports(out: Outputs, options: dict, result, plot: Callable | None = None) -> None:
    """Stage --json (``result.to_dict()``), --markdown (``result.to_markdown()``) and --plot
    (``plot(result, file)``) in ``out``, the command's one all-or-nothing writer."""
    if options.get("json_path"):
        out.file(options["json_path"], lambda f: json.dump(result.to_dict(), f, indent=2))
    if options.get("markdown_path"):
        out.file(options["markdown_path"], lambda f: f.write(result.to_markdown()))
    if options.get("plot_path") and plot is not None:
        out.file(options["plot_path"], lambda f: plot(result, f), binary=True)


def report_files(options: dict, what: str = "report", plot: str = "its plot") -> list[tuple[str, str]]:
    """(path, what it holds) for --json, --markdown and --plot, those given: for ``echo_saved``."""
    kinds = (("json_path", f"the {what} as JSON"), ("markdown_path", f"the {what} as Markdown"), ("plot_path", plot))
    return [(options[key], holds) for key, holds in kinds if options.get(key)]


def echo_saved(files: list[tuple[str | None, str]]) -> None:
    """After the report, a blank line and "saved WHAT to PATH" for each file written (the
    pairs with a path), so every output says where it went."""
    for i, (path, what) in enumerate((p, w) for p, w in files if p):
        click.echo(f"{'' if i else chr(10)}saved {what} to {path}")
