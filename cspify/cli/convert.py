"""``cspify convert`` and ``cspify analyze``: one conversion, its report, and (convert) its files.

    cspify convert model.py -o m.pt --export-dir m_csp --onnx m.onnx --json r.json --seed 0
    cspify convert torchvision:resnet50 --target-flops 0.7 --inference -o r50.pt   # a flops budget; norms folded
    cspify analyze torchvision:densenet121 -q
"""

from __future__ import annotations

import click

from cspify.budget import Search
from cspify.cli.exits import guard
from cspify.cli.options import MODEL_HELP, check_options, conversion_options, plot_option
from cspify.cli.run import (Progress, calibrate_data, calibration_data, echo_saved, load_convert_measure, report_files,
                            stage_reports)
from cspify.data import parse_normalisation
from cspify.errors import ConfigError
from cspify.export import model_file_needs, save_model, write_onnx, write_source
from cspify.files import Outputs
from cspify.fuse import fold_norms
from cspify.rules import DESCRIPTIONS, KINDS

# the stage kinds as the help says them: "residual (chains of x + f(x) blocks), ... and plain (...)"
_KINDS = [f"{kind} ({DESCRIPTIONS[kind]})" for kind in KINDS]
KINDS_HELP = ", ".join(_KINDS[:-1]) + (" and " if len(_KINDS) > 1 else "") + _KINDS[-1]


@click.command(help=f"Convert MODEL's stages to CSP and report the savings. The stages it finds: {KINDS_HELP}."
                    f"\n\n{MODEL_HELP}")
@conversion_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save the converted model (torch.save of the whole module; it loads without cspify, with torch and the packages its layers come from: torch.load(PATH, weights_only=False), which runs pickled code, so only load files you trust). A layer or function defined in MODEL's own file is pickled under a name only that cspify run had, so the file will not load elsewhere: import it from a module of its own, or use --onnx.")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None, metavar="DIR", help="Write the converted model as readable Python (DIR/model.py) plus weights (DIR/weights.pt) that load with torch alone.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, metavar="PATH", help="Export the converted model to ONNX (torch.onnx.export with the example inputs; the batch axis is dynamic).")
@click.option("--yolo", "yolo_path", type=click.Path(dir_okay=False), default=None, metavar="PATH", help="Save a converted ultralytics detector as an ultralytics checkpoint that YOLO(PATH) loads as the converted architecture, to train with ultralytics' trainer: YOLO(PATH).train(..., trainer=cspify.integrations.ultralytics.Trainer) (it needs cspify to load).")
@click.option("--onnx-static", is_flag=True, help="With --onnx: keep the example inputs' batch size fixed in the ONNX graph.")
@plot_option("Draw per-stage flops and memory traffic, before and after, in the format the suffix names "
             "(.png, .jpg, .pdf, .svg, ...).")
@click.option("--calibrate", "calibrate_path", default=None, metavar="DATA", help="Calibrate the converted model on 2,048 training images of DATA (train/<class>/* folders or IDX files; no labels) before saving it; with --split importance, 512 of them choose the channels that run through each stage first.")
@click.option("--mean", default=None, metavar="M[,M,M]|none|data", help="With --calibrate: normalise DATA's images by this mean per channel ('none': leave them in [0, 1]; 'data': DATA's own mean and std) [default: what a zoo model's weights say, else none].")
@click.option("--std", default=None, metavar="S[,S,S]|none|data", help="With --calibrate: the std that goes with --mean.")
@click.option("--inference", is_flag=True, help="Save and export the converted model for inference: in eval mode, each norm that follows a conv folded into it (checked against the unfused model on the example inputs; after --calibrate). With --objective latency or --target-latency, stages are timed folded too.")
def convert(output, export_dir, onnx_path, yolo_path, calibrate_path, inference, **options) -> None:
    with guard(options["debug"]):
        _convert(options, output, export_dir, onnx_path, calibrate_path, inference, yolo_path=yolo_path)


@click.command(help=f"Show the stages found in MODEL, what converting each would save, and why any is left as it "
                    f"is (the report, even where no stage converts). The stages it looks for: {KINDS_HELP}."
                    f"\n\n{MODEL_HELP}")
@conversion_options
def analyze(**options) -> None:
    with guard(options["debug"]):
        _convert(options, refuse_none=False)


def _convert(options: dict, output: str | None = None, export_dir: str | None = None,
             onnx_path: str | None = None, calibrate_path: str | None = None, inference: bool = False,
             refuse_none: bool = True, yolo_path: str | None = None) -> None:
    if options.get("onnx_static") and not onnx_path:
        raise ConfigError("--onnx-static applies to an ONNX export, and there is none.", "add --onnx PATH, or drop --onnx-static")
    if yolo_path and inference:
        raise ConfigError("--yolo saves a model to train, with its norms, and --inference folds them into the convs.",
                          "drop one of --yolo and --inference")
    check_options(options, ("-o", output), ("--export-dir", export_dir), ("--onnx", onnx_path), ("--yolo", yolo_path),
                  data=calibrate_path)
    if calibrate_path:
        parse_normalisation(options["mean"], options["std"])  # a bad --mean/--std fails before any work
    elif options.get("mean") is not None or options.get("std") is not None:
        raise ConfigError("--mean and --std say how to read the images of --calibrate, and there is none.",
                          "add --calibrate DATA, or drop --mean/--std")
    progress = Progress(options["quiet"])
    images = (lambda loaded: calibration_data(calibrate_path, loaded, options, progress)) if calibrate_path else None
    done = load_convert_measure(options, progress, search=Search(fold=True) if inference else None,
                                refuse_none=refuse_none, images=images)
    if calibrate_path:
        calibrate_data(done, progress)
    csp, folded = done.csp, None
    if inference:
        with progress("folding norms into convs"):
            folded = fold_norms(done.csp.eval(), done.inputs, leaf_modules=options["leaves"])
        csp = folded.model
    with Outputs(force=options["force"]) as out:  # all written, or none
        if output:
            out.path(output, lambda tmp: save_model(csp, tmp), suffix=".pt")  # loads without cspify
        if export_dir:
            with progress(f"writing {export_dir}"):
                out.folder(export_dir, lambda folder: write_source(csp, folder))
        if onnx_path:
            with progress(f"exporting {onnx_path}"):
                out.path(onnx_path, lambda tmp: write_onnx(csp, done.inputs, tmp, dynamic_batch=not options.get("onnx_static")),
                         suffix=".onnx")
        if yolo_path:
            from cspify.integrations import ultralytics as csp_yolo

            out.path(yolo_path, lambda tmp: csp_yolo.save(csp, tmp), suffix=".pt")
        stage_reports(out, options, done.report, plot=lambda report, f: _plot(report, f, options["plot_path"]))
    click.echo(str(done.report))  # after the files: an error never follows a report
    if folded is not None:
        click.echo(f"\nfor inference: {folded.summary()}")
    echo_saved([(output, "the converted model"), (export_dir, "its source and weights"), (onnx_path, "its ONNX export"),
                (yolo_path, "the ultralytics checkpoint (train it with trainer=cspify.integrations.ultralytics.Trainer)"),
                *report_files(options, plot="the plot of its stages")])
    needs = model_file_needs(csp) if output else []
    if needs:
        click.echo(f"note: {output} loads only where {', '.join(needs)} (defined in {options['model']}) can be imported "
                   "by the name this run gave them; import them from a module of their own, or use --onnx", err=True)


def _plot(report, f, path: str) -> None:
    from cspify.plot import plot_format, plot_report  # matplotlib loads only when a plot is asked for

    plot_report(report, f, plot_format(path))
