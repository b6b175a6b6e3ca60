"""``cspify bench`` and ``cspify sweep``: the commands that prove the savings.

They live beside ``cli.py`` (which imports this module to register them on its group)
so that each file stays one screenful of option parsing:

    cspify bench torchvision:resnet50 --batch-sizes 1,16 --threads 2
    cspify sweep torchvision:resnet50 --gammas 0.25,0.5,0.75 --fusion last,first --plot sweep.png
"""

from __future__ import annotations

import json

import click

from cspify import api
from cspify.cli import MODEL_HELP, _check_writable, _config, _errors, _options, _Progress, _write, main
from cspify.config import FUSIONS, HIDDEN, CSPConfig
from cspify.errors import ConfigError
from cspify.load import load_model, parse_shape


@main.command(help=f"Time MODEL and its CSP version side by side: median ms, speed-up, flops ratio.\n\n{MODEL_HELP}")
@_options
@click.option("--batch-sizes", default="1", show_default=True, metavar="B1,B2", help="Batch sizes to time.")
@click.option("--threads", type=int, default=None, help="Intra-op threads [default: torch.get_num_threads()].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to time; auto: the CPU, and CUDA too when present.")
@click.option("--min-run-time", type=float, default=1.0, show_default=True,
              help="Seconds of timing per model, round and batch size.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="How often the two models take turns.")
def bench(batch_sizes, threads, device, min_run_time, rounds, **options) -> None:
    with _errors(options["debug"]):
        from cspify.bench import benchmark, resolve_devices

        config = _config(options)
        sizes = _int_list(batch_sizes)
        shape = parse_shape(options["input_shape"]) if options["input_shape"] is not None else None
        for path in (p for p in (options["json_path"], options["markdown_path"]) if p):
            _check_writable(path, options["force"])
        devices = resolve_devices(device)
        progress = _Progress(options["quiet"])
        with progress(f"loading {options['model']}"):
            loaded = load_model(options["model"], shape)
        with progress("tracing and converting"):
            csp = api.convert(loaded.model, loaded.example_inputs, config=config, scope=options["scope"],
                              leaf_modules=options["leaves"], seed=options.get("seed") or 0)
        with progress("counting flops"):
            report = api.compare(loaded.model, csp, loaded.example_inputs, scope=options["scope"],
                                 leaf_modules=options["leaves"])
        with progress(f"timing both models on {' and '.join(devices)} at batch sizes {','.join(map(str, sizes))}"):
            result = benchmark(loaded.model, csp, loaded.example_inputs, sizes, threads, device,
                               min_run_time=min_run_time, rounds=rounds)
        result.flops = (report.original.flops, report.converted.flops)
        if options["json_path"]:
            _write(options["json_path"], lambda f: json.dump(result.to_dict(), f, indent=2))
        if options["markdown_path"]:
            _write(options["markdown_path"], lambda f: f.write(result.to_markdown()))
        click.echo(str(result))


@main.command(help=f"Convert MODEL at every gamma, fusion and hidden given; one table of the savings.\n\n{MODEL_HELP}")
@click.argument("model")
@click.option("--gammas", default="0.25,0.5,0.75", show_default=True, metavar="G1,G2", help="Bypass fractions to try.")
@click.option("--fusion", "fusions", default="last", show_default=True, metavar="last,first", help="Fusions to try.")
@click.option("--hidden", "hiddens", default="keep", show_default=True, metavar="keep,scale", help="Inner widths to try.")
@click.option("--stage", "stages", multiple=True, metavar="NAME", help="Convert only this stage (repeatable).")
@click.option("--allow-costlier", is_flag=True, help="Also convert stages that cost more than they save.")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Example input shape.")
@click.option("--scope", default=None, metavar="PATH", help="Convert only this submodule.")
@click.option("--leaf", "leaves", multiple=True, metavar="PATH", help="Keep this submodule opaque when tracing.")
@click.option("--latency", is_flag=True, help="Also time every point against the original (slow).")
@click.option("--batch-sizes", default="1", show_default=True, metavar="B1,B2", help="Batch sizes for --latency.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for --latency.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to time.")
@click.option("--min-run-time", type=float, default=1.0, show_default=True, help="Seconds of timing per model and round.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the sweep as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Write the sweep as Markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="PATH.png",
              help="Draw flops (and latency) against gamma as a PNG.")
@click.option("--force", is_flag=True, help="Overwrite output files that exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar on stderr.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def sweep(model, gammas, fusions, hiddens, **options) -> None:
    with _errors(options["debug"]):
        from cspify.sweep import sweep as run_sweep

        gamma_values = tuple(CSPConfig(g.strip()).gamma for g in gammas.split(",") if g.strip())
        if not gamma_values:
            raise ConfigError(f"--gammas {gammas!r} names no gamma.", "write them as --gammas 0.25,0.5,0.75")
        sizes = _int_list(options["batch_sizes"])
        shape = parse_shape(options["input_shape"]) if options["input_shape"] is not None else None
        for path in (p for p in (options["json_path"], options["markdown_path"], options["plot_path"]) if p):
            _check_writable(path, options["force"])
        with _Progress(options["quiet"])(f"loading {model}"):
            loaded = load_model(model, shape)
        result = run_sweep(
            loaded.model, loaded.example_inputs, gamma_values, _word_list(fusions, FUSIONS, "fusion"),
            _word_list(hiddens, HIDDEN, "hidden"), stages=options["stages"] or None,
            allow_costlier=options["allow_costlier"], scope=options["scope"], leaf_modules=options["leaves"],
            latency=options["latency"], batch_sizes=sizes, threads=options["threads"], device=options["device"],
            min_run_time=options["min_run_time"], progress=not options["quiet"],
        )
        if options["json_path"]:
            _write(options["json_path"], lambda f: json.dump(result.to_dict(), f, indent=2))
        if options["markdown_path"]:
            _write(options["markdown_path"], lambda f: f.write(result.to_markdown()))
        if options["plot_path"]:
            from cspify.plot import plot_sweep  # matplotlib loads only when a plot is asked for

            _write(options["plot_path"], lambda f: plot_sweep(result, f), binary=True)
        click.echo(str(result))
        if options["plot_path"]:
            click.echo(f"\nplotted flops against gamma to {options['plot_path']}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"batch sizes {text!r} are not a list of positive integers.", "write them as --batch-sizes 1,16")
    return values


def _word_list(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    wrong = [v for v in values if v not in allowed]
    if not values or wrong:
        raise ConfigError(f"--{option} takes {' or '.join(allowed)}, got {text!r}.",
                          f"for example --{option} {','.join(allowed)}")
    return values
