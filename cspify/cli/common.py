"""What every command shares: its options, the load-convert-measure step, errors, stops
from outside, progress lines, the output files, and the training-data steps (open DATA,
check the model takes it, calibrate) of ``finetune`` and ``convert --calibrate``. A command
file parses its own few options and calls these:

    @click.command()
    @conversion_options                      # MODEL, --gamma ... --weights, --json ... --debug
    def analyze(**options):
        with guard(options["debug"]):        # errors -> one line + exit code; SIGINT/SIGTERM -> 130/143
            check_options(options)           # bad options and unwritable outputs, before the long work
            done = load_convert_measure(options, Progress(options["quiet"]))
            with Outputs(force=options["force"]) as out:    # every file, all written or none
                stage_reports(out, options, done.report)
            click.echo(str(done.report))

``options`` is the dict click passes: the keys are the parameter names declared here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn as nn

from cspify import api
from cspify.budget import OBJECTIVES, Goal, Search
from cspify.calibrate import calibrate
from cspify.config import FUSIONS, HIDDEN, CSPConfig
from cspify.data import ImageData, open_data
from cspify.errors import ConfigError, CspifyError, DataError, OutputError
from cspify.export import Outputs
from cspify.load import Loaded, check_weights_file, load_model, parse_shape
from cspify.report import Report
from cspify.rules import KINDS

MODEL_HELP = (
    "MODEL is path/to/model.py[:Name], torchvision:NAME, timm:NAME or ultralytics:NAME.yaml. "
    "A model file is executed to build the model: only use files you trust."
)

# ---------------------------------------------------------------- options

_MODEL = (
    click.argument("model"),
    click.option("--weights", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                 help="Load this state dict into the model before converting (torch.load with weights_only=True; "
                      "a checkpoint's 'state_dict' or 'model' entry and a DDP 'module.' prefix are understood)."),
    click.option("--input-shape", default=None, metavar="N,C,H,W",
                 help="Example input shape [default: example_inputs() from the file, else 1,3,224,224]."),
    click.option("--scope", default=None, metavar="PATH",
                 help="Convert only this submodule (e.g. backbone.body) inside a copy of the whole model."),
    click.option("--leaf", "leaves", multiple=True, metavar="PATH",
                 help="Keep this submodule opaque when tracing (repeatable)."),
)
_STAGES = (
    click.option("--kind", "kinds", default=None, metavar="KIND[,KIND]",
                 help=f"Look only for stages of these kinds ({', '.join(KINDS)}) [default: every kind]; "
                      "residual,dense is the paper's transform alone."),
    click.option("--stage", "stages", multiple=True, metavar="NAME",
                 help="Convert only this stage (repeatable); see `cspify analyze`."),
    click.option("--allow-costlier", is_flag=True,
                 help="Also convert stages whose new partial transition costs more than they save."),
)
_OBJECTIVE = (
    click.option("--objective", type=click.Choice(OBJECTIVES), default="flops", show_default=True,
                 help="What chooses the stages: flops (fvcore's count), or latency (each stage timed on the "
                      "target device, CUDA when present, else the CPU, in the converted model with it and without "
                      "it; converted only where the model runs faster with it)."),
    click.option("--target-flops", default=None, metavar="FRACTION",
                 help="Choose each stage's gamma and inner widths so the model keeps this fraction of the "
                      "original's flops (0.7: 30% fewer); with --objective latency, the cuts that buy the most time."),
    click.option("--target-latency", default=None, metavar="FRACTION",
                 help="The same for the measured time on the target device (0.8: 20% faster)."),
)
_POINT = (
    click.option("--gamma", default="0.5", show_default=True,
                 help="Fraction of channels that bypass each stage (0 < gamma < 1)."),
    click.option("--fusion", type=click.Choice(FUSIONS), default="last", show_default=True,
                 help="Transition then concat (last) or concat then transition (first)."),
    click.option("--hidden", type=click.Choice(HIDDEN), default="keep", show_default=True,
                 help="Keep the blocks' inner widths, or scale them by 1 - gamma."),
    click.option("--round-to", default="1", show_default=True, metavar="N",
                 help="Round every narrowed width to a multiple of N channels (8 or 16 keeps CPU and GPU kernels "
                      "on their fast paths)."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed of the new layers' initialisation (same seed, same model)."),
)


def _apply(fn, decorators):
    for decorate in reversed(decorators):  # click lists options in the order written here
        fn = decorate(fn)
    return fn


def model_options(fn):
    """MODEL and how to build and trace it: --weights, --input-shape, --scope, --leaf."""
    return _apply(fn, _MODEL)


def stage_options(fn):
    """Which stages to convert: --kind, --stage, --allow-costlier."""
    return _apply(fn, _STAGES)


def objective_options(fn):
    """How the stages and their options are chosen: --objective, --target-flops, --target-latency."""
    return _apply(fn, _OBJECTIVE)


def point_options(fn):
    """One conversion's choices: --gamma, --fusion, --hidden, --round-to, --seed."""
    return _apply(fn, _POINT)


def output_options(what: str = "report"):
    """--json, --markdown (of ``what`` the command prints), --force, -q, --debug."""
    return lambda fn: _apply(fn, (
        click.option("--json", "json_path", type=click.Path(dir_okay=False), help=f"Write the {what} as JSON."),
        click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False),
                     help=f"Write the {what} as Markdown."),
        click.option("--force", is_flag=True, help="Overwrite output files that exist."),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr."),
        click.option("--debug", is_flag=True, help="Show Python tracebacks."),
    ))


def plot_option(help: str):
    """--plot PATH.png, written with the command's other files (``stage_reports(plot=...)``)."""
    return click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="PATH.png",
                        help=help)


def conversion_options(fn):
    """Everything one conversion takes (convert, analyze, bench)."""
    return point_options(objective_options(stage_options(model_options(output_options()(fn)))))


def config_from(options: dict) -> CSPConfig:
    """The conversion options as one validated record."""
    return CSPConfig(options["gamma"], options["fusion"], options["hidden"], options["stages"] or None,
                     options["allow_costlier"], options["kinds"], round_to=options["round_to"])


def goal_from(options: dict) -> Goal:
    """--objective, --target-flops and --target-latency as one validated Goal (the default
    where a command has none of them)."""
    return Goal(options.get("objective", "flops"), options.get("target_flops"), options.get("target_latency"))


def batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,16"`` -> (1, 16); a ConfigError for anything else."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"batch sizes {text!r} are not a list of positive integers.", "write them as --batch-sizes 1,16")
    return values


def check_options(options: dict, *outputs: str | None) -> None:
    """What can be refused before any long work: the conversion options (where the command
    takes them), the input shape, the weights file, and every output path (``options``'
    --json/--markdown/--plot and ``outputs``)."""
    if "gamma" in options:
        config_from(options)
    if "objective" in options:
        goal_from(options)
    if options["input_shape"] is not None:
        parse_shape(options["input_shape"])
    if options["weights"] is not None:
        check_weights_file(options["weights"])
    reports = (options.get(key) for key in ("json_path", "markdown_path", "plot_path"))
    for path in (p for p in (*outputs, *reports) if p):
        check_writable(path, options["force"])


def check_writable(path: str, force: bool) -> None:
    """An OutputError when ``path`` exists (without ``force``) or its folder cannot take it."""
    target = Path(path)
    if target.exists() and not force:
        raise OutputError(f"{path} already exists.", "pass --force to overwrite it, or choose another path")
    folder = target.parent if str(target.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder.", "choose a path inside a folder")
    if not folder.is_dir():
        raise OutputError(f"folder {folder} does not exist.", "create it first or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"folder {folder} is not writable.", "choose another path")


# ---------------------------------------------------------------- the work


@dataclass(frozen=True)
class Converted:
    """What the load-convert-measure step gives a command."""

    model: nn.Module          # the original, as loaded (with --weights)
    inputs: tuple             # its example inputs
    csp: nn.Module            # the converted model
    report: Report            # both models measured


def load_model_step(options: dict, progress: Progress) -> Loaded:
    """MODEL (with --weights, --input-shape) as a module and example inputs, with its progress line."""
    shape = parse_shape(options["input_shape"]) if options["input_shape"] is not None else None
    weights = options["weights"]
    with progress(f"loading {options['model']}" + (f" with weights {weights}" if weights else "")):
        return load_model(options["model"], shape, weights=weights)


def load_convert_measure(options: dict, progress: Progress, measuring: str = "measuring both models",
                         search: Search | None = None) -> Converted:
    """Load MODEL, convert it with the options, measure both: one progress line per step.
    ``search``: how a budget or the latency objective times stages (``bench`` times them as
    it times the models)."""
    config, goal = config_from(options), goal_from(options)
    loaded = load_model_step(options, progress)
    with progress(_choosing(goal) if goal.active else "tracing and converting"):
        csp = api.convert(loaded.model, loaded.example_inputs, config=config, scope=options["scope"],
                          leaf_modules=options["leaves"], seed=options["seed"], objective=goal.objective,
                          target_flops=goal.target_flops, target_latency=goal.target_latency,
                          search=search if goal.active else None)
    with progress(measuring):
        report = api.compare(loaded.model, csp, loaded.example_inputs, scope=options["scope"],
                             leaf_modules=options["leaves"])
    return Converted(loaded.model, loaded.example_inputs, csp, report)


def _choosing(goal: Goal) -> str:
    """The progress line of a conversion a goal chooses (it converts, measures or times many times)."""
    what = [f"{what} {value:g}" for what, value in goal.targets] or ["the stages that pay"]
    how = "timing each stage" if goal.timed else "measuring every stage at each option"
    return f"choosing stages for {' and '.join(what)} by {goal.objective} ({how})"


def stage_reports(out: Outputs, options: dict, result, plot: Callable | None = None) -> None:
    """Stage --json (``result.to_dict()``), --markdown (``result.to_markdown()``) and --plot
    (``plot(result, file)``) in ``out``, the command's one all-or-nothing writer."""
    if options.get("json_path"):
        out.file(options["json_path"], lambda f: json.dump(result.to_dict(), f, indent=2))
    if options.get("markdown_path"):
        out.file(options["markdown_path"], lambda f: f.write(result.to_markdown()))
    if options.get("plot_path") and plot is not None:
        out.file(options["plot_path"], lambda f: plot(result, f), binary=True)


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


# ---------------------------------------------------------------- errors and stops


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop from outside: Ctrl-C (SIGINT) or SIGTERM (``kill``, a job scheduler).

    A KeyboardInterrupt, so ``with`` blocks unwind as for Ctrl-C (``Outputs`` discards what
    it staged) and ``except Exception`` in the work does not swallow it; a long loop that
    wants to save its state first catches it, saves, and raises it again.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """Inside the block, SIGINT and SIGTERM raise ``Interrupted`` in the main thread; the
    previous handlers come back afterwards. A signal the process was told to ignore (as
    ``nohup`` or a shell's ``&`` do) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers, and only it receives them
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def guard(debug: bool):
    """The one wrapper around a command's work.

    CspifyErrors become one ``error:`` line, a ``hint:`` line and their exit code; any other
    exception is an internal error (exit 1); Ctrl-C and SIGTERM stop the work cleanly
    (files being written are discarded) with exit code 130 or 143. ``--debug`` shows the
    Python traceback instead (before the lines, for a stop).
    """
    try:
        with stop_on_signals():
            yield
    except KeyboardInterrupt as stop:
        code = stop.exit_code if isinstance(stop, Interrupted) else 128 + signal.SIGINT
        if debug:
            traceback.print_exc()
        name = "Ctrl-C (SIGINT)" if code == 128 + signal.SIGINT else signal.Signals(code - 128).name
        click.echo(f"error: interrupted by {name}.", err=True)
        click.echo("hint: no file was left half-written; run the command again to finish it", err=True)
        sys.exit(code)
    except CspifyError as error:
        if debug:
            raise
        click.echo(f"error: {error.message}", err=True)
        if error.hint:
            click.echo(f"hint: {error.hint}", err=True)
        sys.exit(error.exit_code)
    except Exception as error:  # a bug of ours: say so in one line
        if debug:
            raise
        click.echo(f"error: internal error ({type(error).__name__}: {error}).", err=True)
        click.echo("hint: rerun with --debug and report the traceback", err=True)
        sys.exit(1)


# ---------------------------------------------------------------- training data (finetune, convert --calibrate)


def data_step(path: str, progress: Progress, channels: int | None = None) -> ImageData:
    """DATA opened, with its progress line."""
    with progress(f"reading {path}"):
        return open_data(path, channels=channels)


def calibrate_data(path: str, model: nn.Module, csp: nn.Module, spec: str, progress: Progress,
                   images: int = 2048) -> None:
    """``cspify convert --calibrate DATA``: open DATA, check MODEL takes its images, calibrate."""
    data = data_step(path, progress)
    check_fits(model, data, spec, classes=False)
    calibrate_step(model, csp, data, images, progress)


def check_fits(model: nn.Module, data: ImageData, spec: str, classes: bool = True) -> None:
    """A DataError when MODEL cannot take DATA's images or (``classes``) has fewer outputs
    than DATA has classes."""
    x = torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])
    expected = next((m.in_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if expected is not None and expected != data.channels:
        hint = ("read the images as RGB with --channels 3" if data.channels == 1 and expected == 3
                else "use images with as many channels as the model's first conv takes")
        raise DataError(f"{spec} takes {expected}-channel images but {data.source} has {data.channels}-channel images.",
                        hint)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise DataError(f"{spec} does not run on the {'x'.join(map(str, x.shape[1:]))} images of {data.source}: {first}.",
                        "give images of the size and channels the model takes") from None
    finally:
        for m, flag in flags.items():
            m.training = flag
    if not classes:
        return
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise DataError(f"{spec} does not output class scores (one row per image), so it cannot be scored on "
                        f"{data.source}.", "fine-tune a classifier, or use the Python API with your own loss")
    if out.shape[1] < data.num_classes:
        raise DataError(f"{data.source} has {data.num_classes} classes but {spec} has only {out.shape[1]} outputs.",
                        "give a model with one output per class (or more)")


def calibrate_step(model: nn.Module, csp: nn.Module, data: ImageData, images: int, progress: Progress) -> None:
    """Calibrate ``csp`` on ``images`` training images of DATA (no labels), with its progress line."""
    count = min(images, len(data.train))
    with progress(f"calibrating on {count} images"):
        calibrate(model, csp, data.train, max_images=count)
