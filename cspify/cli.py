"""``cspify convert`` and ``cspify analyze``: parse options, call the API, print.

Loading MODEL runs the Python code in that file, as ``python model.py`` would: only
convert files you trust. Exit codes: 0 done, 1 internal error, 2 bad option,
3 model not loadable, 4 not traceable, 5 no convertible stage, 6 output not writable.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from cspify import api
from cspify.config import FUSIONS, HIDDEN, CSPConfig
from cspify.errors import CspifyError, OutputError
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
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save the converted model (torch.save of the whole module).")
def convert(output, **options) -> None:
    _run(options, output)


@main.command(help=f"Show the stages found in MODEL and what converting each would save.\n\n{MODEL_HELP}")
@_options
def analyze(**options) -> None:
    _run(options, None)


def _run(options: dict, output: str | None) -> None:
    debug, quiet = options["debug"], options["quiet"]
    try:
        _convert_and_report(options, output, quiet)
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


def _convert_and_report(options: dict, output: str | None, quiet: bool) -> None:
    config = CSPConfig(
        options["gamma"], options["fusion"], options["hidden"], options["stages"] or None, options["allow_costlier"]
    )
    shape = parse_shape(options["input_shape"]) if options["input_shape"] is not None else None
    targets = [p for p in (output, options["json_path"], options["markdown_path"]) if p]
    for path in targets:
        _check_writable(path, options["force"])
    progress = _Progress(quiet)
    with progress(f"loading {options['model']}"):
        loaded = load_model(options["model"], shape)
    with progress("tracing and converting"):
        csp = api.convert(
            loaded.model, loaded.example_inputs, config=config, scope=options["scope"], leaf_modules=options["leaves"]
        )
    with progress("measuring both models"):
        report = api.compare(
            loaded.model, csp, loaded.example_inputs, scope=options["scope"], leaf_modules=options["leaves"]
        )
    click.echo(str(report))
    if output:
        _write(output, lambda f: torch.save(csp, f), binary=True)
        click.echo(f"\nsaved the converted model to {output}")
    if options["json_path"]:
        _write(options["json_path"], lambda f: json.dump(report.to_dict(), f, indent=2))
    if options["markdown_path"]:
        _write(options["markdown_path"], lambda f: f.write(report.to_markdown()))


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
    if not folder.is_dir():
        raise OutputError(f"folder {folder} does not exist.", "create it first or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"folder {folder} is not writable.", "choose another path")


def _write(path: str, write, binary: bool = False) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cspify-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}.", "choose another path") from exc
        raise


if __name__ == "__main__":
    main()
