"""``cspify convert`` and ``cspify analyze``: parse options, call the API, print.

Loading MODEL runs the Python code in that file, as ``python model.py`` would: only
convert files you trust. Exit codes: 0 done, 1 internal error, 2 bad option,
3 model not loadable, 4 not traceable, 5 no convertible stage, 6 output not writable
(or already there, or the model cannot be written in the format asked for).

    cspify convert model.py -o m.pt --export-dir m_csp --onnx m.onnx --seed 0
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from cspify import api
from cspify.config import FUSIONS, HIDDEN, CSPConfig
from cspify.errors import CspifyError, OutputError
from cspify.export import Outputs, write_onnx, write_source
from cspify.load import load_model, parse_shape

MODEL_HELP = (
    "MODEL is path/to/model.py[:Name], torchvision:NAME or timm:NAME. "
    "A model file is executed to build the model: only use files you trust."
)


def _options(fn):
    """The options convert and analyze share."""
    decorators = [
        click.argument("model"),
        click.option("--gamma", default="0.5", show_default=True, help="Fraction of channels that bypass each stage (0 < gamma < 1)."),
        click.option("--fusion", type=click.Choice(FUSIONS), default="last", show_default=True, help="Transition then concat (last) or concat then transition (first)."),
        click.option("--hidden", type=click.Choice(HIDDEN), default="keep", show_default=True, help="Keep the blocks' inner widths, or scale them by 1 - gamma."),
        click.option("--stage", "stages", multiple=True, metavar="NAME", help="Convert only this stage (repeatable); see `cspify analyze`."),
        click.option("--allow-costlier", is_flag=True, help="Also convert stages whose new partial transition costs more than they save."),
        click.option("--input-shape", default=None, metavar="N,C,H,W", help="Example input shape [default: example_inputs() from the file, else 1,3,224,224]."),
        click.option("--scope", default=None, metavar="PATH", help="Convert only this submodule (e.g. backbone.body) inside a copy of the whole model."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new layers' initialisation (same seed, same model)."),
        click.option("--leaf", "leaves", multiple=True, metavar="PATH", help="Keep this submodule opaque when tracing (repeatable)."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON."),
        click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Write the report as Markdown."),
        click.option("--force", is_flag=True, help="Overwrite output files that exist."),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr."),
        click.option("--debug", is_flag=True, help="Show Python tracebacks."),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


@click.group(help=f"Turn a PyTorch model into its Cross Stage Partial (CSP) version.\n\n{MODEL_HELP}")
@click.version_option(package_name="cspify")
def main() -> None:
    pass


@main.command(help=f"Convert MODEL's residual and dense stages to CSP and report the savings.\n\n{MODEL_HELP}")
@_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save the converted model (torch.save of the whole module; load it with torch.load(PATH, weights_only=False), which runs pickled code: only load files you trust).")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None, metavar="DIR", help="Write the converted model as readable Python (DIR/model.py) plus weights (DIR/weights.pt) that load with torch alone.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, metavar="PATH", help="Export the converted model to ONNX (torch.onnx.export with the example inputs).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="PATH.png", help="Draw per-stage flops and memory traffic, before and after, as a PNG.")
def convert(output, **options) -> None:
    _run(options, output)


@main.command(help=f"Show the stages found in MODEL and what converting each would save.\n\n{MODEL_HELP}")
@_options
def analyze(**options) -> None:
    _run(options, None)


def _run(options: dict, output: str | None) -> None:
    with _errors(options["debug"]):
        _convert_and_report(options, output, options["quiet"])


@contextmanager
def _errors(debug: bool):
    """CspifyErrors as one line, a hint and their exit code; anything else as an internal error."""
    try:
        yield
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


def _config(options: dict) -> CSPConfig:
    """The conversion options every command shares, as one validated record."""
    return CSPConfig(
        options["gamma"], options["fusion"], options["hidden"], options["stages"] or None, options["allow_costlier"]
    )


def _convert_and_report(options: dict, output: str | None, quiet: bool) -> None:
    config = _config(options)
    shape = parse_shape(options["input_shape"]) if options["input_shape"] is not None else None
    export_dir, onnx_path = options.get("export_dir"), options.get("onnx_path")
    plot_path = options.get("plot_path")
    targets = [p for p in (output, export_dir, onnx_path, options["json_path"], options["markdown_path"], plot_path) if p]
    for path in targets:
        _check_writable(path, options["force"])
    progress = _Progress(quiet)
    with progress(f"loading {options['model']}"):
        loaded = load_model(options["model"], shape)
    with progress("tracing and converting"):
        csp = api.convert(
            loaded.model, loaded.example_inputs, config=config, scope=options["scope"], leaf_modules=options["leaves"],
            seed=options["seed"],
        )
    with progress("measuring both models"):
        report = api.compare(
            loaded.model, csp, loaded.example_inputs, scope=options["scope"], leaf_modules=options["leaves"]
        )
    with Outputs(force=options["force"]) as out:  # all written, or none
        if output:
            out.file(output, lambda f: torch.save(csp, f), binary=True)
        if export_dir:
            with progress(f"writing {export_dir}"):
                out.folder(export_dir, lambda folder: write_source(csp, folder))
        if onnx_path:
            with progress(f"exporting {onnx_path}"):
                out.path(onnx_path, lambda tmp: write_onnx(csp, loaded.example_inputs, tmp), suffix=".onnx")
        if options["json_path"]:
            out.file(options["json_path"], lambda f: json.dump(report.to_dict(), f, indent=2))
        if options["markdown_path"]:
            out.file(options["markdown_path"], lambda f: f.write(report.to_markdown()))
        if plot_path:
            from cspify.plot import plot_report  # matplotlib loads only when a plot is asked for

            out.file(plot_path, lambda f: plot_report(report, f), binary=True)
    click.echo(str(report))  # after the files: an error never follows a report
    saved = [(p, what) for p, what in ((output, "the converted model"), (export_dir, "its source and weights"),
                                        (onnx_path, "its ONNX export")) if p]
    for i, (path, what) in enumerate(saved):
        click.echo(f"{'' if i else chr(10)}saved {what} to {path}")


class _Progress:
    """One line per step on stderr, with its time, so long work is never silent."""

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


def _check_writable(path: str, force: bool) -> None:
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


def _write(path: str, write, binary: bool = False) -> None:
    """Write one file to a temporary path beside ``path``, then rename: never a half-written file."""
    with Outputs(force=True) as out:
        out.file(path, write, binary)


from cspify import cli_measure  # noqa: E402,F401  registers `cspify bench` and `cspify sweep` on main

if __name__ == "__main__":
    main()
