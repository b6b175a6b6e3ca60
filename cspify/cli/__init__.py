"""The ``cspify`` command: a click group over one file per command.

    options.py   the shared options, declared once, and their checks before any long work
    run.py       the shared steps: load, convert, measure, open DATA, calibrate, stage the reports
    exits.py     errors -> one line and an exit code; SIGINT/SIGTERM -> a clean stop (130/143)
    convert.py   cspify convert, cspify analyze
    bench.py     cspify bench
    sweep.py     cspify sweep
    finetune.py  cspify finetune
    evaluate.py  cspify evaluate

Loading MODEL runs the Python code in that file, as ``python model.py`` would: only
convert files you trust. Exit codes: 0 done, 1 internal error, 2 bad option, 3 model not
loadable, 4 not traceable, 5 no convertible stage, 6 output not writable (or already
there, or the model cannot be written in the format asked for), 7 bad training data,
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import click

from cspify.cli import bench, convert, evaluate, finetune, sweep
from cspify.cli.options import MODEL_HELP

__all__ = ["main"]


@click.group(help=f"Turn a PyTorch model into its Cross Stage Partial (CSP) version.\n\n{MODEL_HELP}")
@click.version_option(package_name="cspify")
def main() -> None:
    pass


main.add_command(convert.convert)
main.add_command(convert.analyze)
main.add_command(bench.bench)
main.add_command(sweep.sweep)
main.add_command(finetune.finetune_command)
main.add_command(evaluate.evaluate_command)
