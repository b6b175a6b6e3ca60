"""``cspify convert`` and ``cspify analyze``: one conversion, its report, and (convert) its files.

    cspify convert model.py -o m.pt --export-dir m_csp --onnx m.onnx --json r.json --seed 0
    cspify convert torchvision:resnet50 --target-flops 0.7 --inference -o r50.pt   # a flops budget; norms folded
    cspify analyze torchvision:densenet121 -q
"""

from __future__ import annotations

import click
import torch

from cspify.budget import Search
from cspify.cli.exits import guard
from cspify.cli.options import MODEL_HELP, check_options, conversion_options, plot_option
from cspify.cli.run import Progress, calibrate_data, load_convert_measure, stage_reports
from cspify.export import write_onnx, write_source
from cspify.files import Outputs
from cspify.fuse import fold_norms


@click.command(help=f"Convert MODEL's residual and dense stages to CSP and report the savings.\n\n{MODEL_HELP}")
@conversion_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save the converted model (torch.save of the whole module; load it with torch.load(PATH, weights_only=False), which runs pickled code: only load files you trust).")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None, metavar="DIR", help="Write the converted model as readable Python (DIR/model.py) plus weights (DIR/weights.pt) that load with torch alone.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, metavar="PATH", help="Export the converted model to ONNX (torch.onnx.export with the example inputs).")
@plot_option("Draw per-stage flops and memory traffic, before and after, as a PNG.")
@click.option("--calibrate", "calibrate_path", default=None, metavar="DATA", help="Calibrate the converted model on 2,048 training images of DATA (train/<class>/* folders or IDX files; no labels) before saving it.")
@click.option("--inference", is_flag=True, help="Save and export the converted model for inference: in eval mode, each norm that follows a conv folded into it (checked against the unfused model on the example inputs; after --calibrate). With --objective latency or --target-latency, stages are timed folded too.")
def convert(output, export_dir, onnx_path, calibrate_path, inference, **options) -> None:
    with guard(options["debug"]):
        _convert(options, output, export_dir, onnx_path, calibrate_path, inference)


@click.command(help=f"Show the stages found in MODEL and what converting each would save.\n\n{MODEL_HELP}")
@conversion_options
def analyze(**options) -> None:
    with guard(options["debug"]):
        _convert(options)


def _convert(options: dict, output: str | None = None, export_dir: str | None = None,
             onnx_path: str | None = None, calibrate_path: str | None = None, inference: bool = False) -> None:
    check_options(options, output, export_dir, onnx_path)
    progress = Progress(options["quiet"])
    done = load_convert_measure(options, progress, search=Search(fold=True) if inference else None)
    if calibrate_path:
        calibrate_data(calibrate_path, done.model, done.csp, options["model"], progress)
    csp, folded = done.csp, None
    if inference:
        with progress("folding norms into convs"):
            folded = fold_norms(done.csp.eval(), done.inputs, leaf_modules=options["leaves"])
        csp = folded.model
    with Outputs(force=options["force"]) as out:  # all written, or none
        if output:
            out.file(output, lambda f: torch.save(csp, f), binary=True)
        if export_dir:
            with progress(f"writing {export_dir}"):
                out.folder(export_dir, lambda folder: write_source(csp, folder))
        if onnx_path:
            with progress(f"exporting {onnx_path}"):
                out.path(onnx_path, lambda tmp: write_onnx(csp, done.inputs, tmp), suffix=".onnx")
        stage_reports(out, options, done.report, plot=_plot)
    click.echo(str(done.report))  # after the files: an error never follows a report
    if folded is not None:
        click.echo(f"\nfor inference: {folded.summary()}")
    saved = [(p, what) for p, what in ((output, "the converted model"), (export_dir, "its source and weights"),
                                        (onnx_path, "its ONNX export")) if p]
    for i, (path, what) in enumerate(saved):
        click.echo(f"{'' if i else chr(10)}saved {what} to {path}")


def _plot(report, f) -> None:
    from cspify.plot import (
        plot_report,  # matplotlib loads only when a plot is asked for
    )

    plot_report(report, f)
