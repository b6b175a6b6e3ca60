"""The options every command shares, declared once, and their validation before any long work.

    @click.command()
    @conversion_options                      # MODEL, --gamma ... --weights, --json ... --debug
    def analyze(**options):
        check_options(options)               # bad options and unwritable outputs: an error now
        config = config_from(options)        # the conversion options as one CSPConfig

``options`` is the dict click passes: the keys are the parameter names declared here.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from cspify.budget import OBJECTIVES, Goal
from cspify.config import FUSIONS, HIDDEN, PYRAMIDS, SPLITS, CSPConfig
from cspify.errors import ConfigError, DataError, OutputError
from cspify.load import check_weights_file, parse_shape
from cspify.rules import KINDS

MODEL_HELP = (
    "MODEL is path/to/model.py[:Name], torchvision:NAME, timm:NAME or ultralytics:NAME.yaml. "
    "A model file is executed to build the model: only use files you trust."
)

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


class _Float(click.ParamType):
    """A number, shown as FLOAT in --help; text that is no number passes through to the
    option's own check (``CSPConfig``), which refuses it in one sentence with a hint."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value


_POINT = (
    click.option("--gamma", type=_Float(), default="0.5", show_default=True,
                 help="Fraction of channels that bypass each stage (0 < gamma < 1)."),
    click.option("--fusion", type=click.Choice(FUSIONS), default="last", show_default=True,
                 help="Transition then concat (last) or concat then transition (first)."),
    click.option("--hidden", type=click.Choice(HIDDEN), default="keep", show_default=True,
                 help="Keep the blocks' inner widths, or scale them by 1 - gamma."),
    click.option("--round-to", default="1", show_default=True, metavar="N",
                 help="Round every narrowed width to a multiple of N channels (8 or 16 keeps CPU and GPU kernels "
                      "on their fast paths)."),
    click.option("--split", type=click.Choice(SPLITS), default="last", show_default=True,
                 help="Which channels run through each stage: the last ones, or those it works on most, measured on "
                      "the images (importance: convert --calibrate DATA, finetune's DATA; without images the last ones)."),
    click.option("--pyramid", type=click.Choice(PYRAMIDS), default="none", show_default=True,
                 help="maxout: compress every concat that fuses a detector's pyramid levels, where one conv reads it, "
                      "by Maxout over pairs of channels (the paper's EFM; calibration fits that conv)."),
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


def data_options(default_normalisation: str, required: bool = True, what: str = ""):
    """DATA and how to read it: --data, --channels, --mean, --std; ``default_normalisation``
    says what normalises the images when --mean/--std are not given; ``what`` what DATA is for."""
    return lambda fn: _apply(fn, (
        click.option("--data", "data_path", required=required, metavar="DATA",
                     help="The images: an ImageFolder tree or IDX files." + (f" {what}" if what else "")),
        click.option("--channels", type=click.Choice(["1", "3"]), default=None,
                     help="Read the images with this many channels (grey as RGB repeats the channel)."),
        click.option("--mean", default=None, metavar="M[,M,M]|none|data",
                     help="Normalise the images by this mean per channel ('none': leave them in [0, 1]; 'data': the "
                          f"training images' own mean and std) [default: {default_normalisation}, else none]."),
        click.option("--std", default=None, metavar="S[,S,S]|none|data", help="The std that goes with --mean."),
    ))


def point_options(fn):
    """One conversion's choices: --gamma, --fusion, --hidden, --round-to, --split, --pyramid, --seed."""
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
                     options["allow_costlier"], options["kinds"], round_to=options["round_to"],
                     split=options["split"], pyramid=options.get("pyramid", "none"))


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


REPORT_FILES = (("--json", "json_path"), ("--markdown", "markdown_path"), ("--plot", "plot_path"))


def check_options(options: dict, *outputs, data: str | None = None) -> None:
    """What can be refused before any long work: the conversion options (where the command
    takes them), the input shape, the weights file, the DATA folder (``data``), and every
    output path (``options``' --json/--markdown/--plot and ``outputs``): each writable, a
    plot's suffix one matplotlib writes, and no two options writing the same path (an
    output given as ``("-o", path)`` is told apart by its option; a bare path is only
    checked writable)."""
    if "gamma" in options:
        config_from(options)
    if "objective" in options:
        goal_from(options)
    if options["input_shape"] is not None:
        parse_shape(options["input_shape"])
    if options["weights"] is not None:
        check_weights_file(options["weights"])
    named = [o for o in outputs if isinstance(o, tuple)] + [(flag, options.get(key)) for flag, key in REPORT_FILES]
    named = [(flag, path) for flag, path in named if path]
    check_distinct(named)
    if options.get("plot_path"):
        from cspify.plot import plot_format  # matplotlib loads only when a plot is asked for

        plot_format(options["plot_path"])
    for path in dict.fromkeys([p for p in outputs if isinstance(p, str)] + [p for _, p in named]):
        check_writable(path, options["force"])
    if data is not None:
        check_data_folder(data)


def check_distinct(outputs: list[tuple[str, str]]) -> None:
    """An OutputError where two of the (option, path) pairs name the same file."""
    seen: dict[str, str] = {}
    for flag, path in outputs:
        key = os.path.normcase(os.path.realpath(path))
        if key in seen:
            raise OutputError(f"{seen[key]} and {flag} both write {path}.", "give each output a path of its own")
        seen[key] = flag


def check_data_folder(path: str) -> None:
    """A DataError where the DATA folder is missing or a file (what it holds is read later)."""
    if not Path(path).exists():
        raise DataError(f"the data folder {path!r} does not exist.",
                        "give a folder with train/<class>/* images or the four MNIST-style IDX files")
    if not Path(path).is_dir():
        raise DataError(f"{path!r} is a file, not a data folder.",
                        "give a folder with train/<class>/* images or the four MNIST-style IDX files")


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
