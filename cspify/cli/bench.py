"""``cspify bench``: time MODEL and its CSP version side by side.

    cspify bench torchvision:resnet50 --batch-sizes 1,16 --threads 2 --json bench.json
"""

from __future__ import annotations

import click

from cspify.cli.exits import guard
from cspify.cli.options import MODEL_HELP, batch_sizes, check_options, conversion_options
from cspify.cli.run import Progress, echo_saved, load_convert_measure, report_files, stage_reports
from cspify.files import Outputs


@click.command(help=f"Time MODEL and its CSP version side by side: median ms, speed-up, flops ratio.\n\n{MODEL_HELP}")
@conversion_options
@click.option("--batch-sizes", "sizes", default="1", show_default=True, metavar="B1,B2", help="Batch sizes to time.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads to time with [default: 1]; the machine's load is measured and stated beside.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to time; auto: the CPU, and CUDA too when present.")
@click.option("--min-run-time", type=float, default=1.0, show_default=True,
              help="Seconds of timing per model, round and batch size.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="How often the two models take turns.")
def bench(sizes, threads, device, min_run_time, rounds, **options) -> None:
    with guard(options["debug"]):
        from cspify.bench import DEFAULT_THREADS, benchmark, resolve_devices
        from cspify.budget import Search

        check_options(options)
        sizes = batch_sizes(sizes)
        devices = resolve_devices(device)
        progress = Progress(options["quiet"])
        # --objective latency times the stages as this command times the models (at the first batch size)
        search = Search(batch_size=sizes[0], threads=threads, device=device, min_run_time=min_run_time, rounds=rounds)
        done = load_convert_measure(options, progress, measuring="counting flops", search=search)
        if not options["quiet"]:  # the progress bar below counts the blocks timed, with an ETA
            timed = DEFAULT_THREADS if threads is None else threads
            click.echo(f"cspify: timing both models on {' and '.join(devices)} at batch sizes "
                       f"{','.join(map(str, sizes))}, {timed} thread(s)", err=True)
        result = benchmark(done.model, done.csp, done.inputs, sizes, threads, device, min_run_time=min_run_time,
                           rounds=rounds, flops=(done.report.original.flops, done.report.converted.flops),
                           progress=not options["quiet"])
        result.flops_scope = options["scope"]  # with --scope, the flops are the part's
        with Outputs(force=options["force"]) as out:  # all written, or none
            stage_reports(out, options, result)
        click.echo(str(result))
        echo_saved(report_files(options, "timings"))
