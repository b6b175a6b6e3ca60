"""Pictures of a report or a sweep (matplotlib, Agg: no display needed), in the format the
file's suffix names: PNG, JPEG, PDF, SVG, ... (``FORMATS``).

    plot_report(report, "resnet50_csp.png")    # per-stage bars, before/after: flops, memory traffic
                                               # (the FIGURES entries with a ``plot`` panel)
    plot_sweep(result, "sweep.jpg")           # flops (and latency, when timed) against gamma; with
                                               # data, top-1 against flops (and latency): the Pareto picture

Both write to an open binary file too (``plot_report(report, f, "png")``), as the CLI does
to write through a temporary file; ``plot_format(path)`` is the format a path asks for, or
an OutputError before any work where matplotlib writes none.
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cspify.errors import OutputError
from cspify.measure import FIGURES
from cspify.report import scale_of

# The formats a plot is written in, by suffix: those matplotlib's Agg canvas writes, less
# the ones that need more than matplotlib and Pillow (pgf: LaTeX) or hold no picture (raw pixels).
FORMATS = tuple(sorted(set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf", "raw", "rgba"}))

ORIGINAL, CONVERTED = "#8c8c8c", "#1f77b4"
SERIES = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _scale(largest: float, unit: str) -> tuple[float, str]:
    """The divisor and prefixed unit that keep axis numbers between 1 and 1000."""
    divisor, prefix = scale_of(largest)
    return divisor, f"{prefix}{unit}"


def _accuracy_panels(result, axes, series: dict, colors: dict, scale: float, unit: str) -> None:
    """Top-1 against flops, and against latency (the smallest batch timed) where timed."""
    panels = [("flops", f"{unit} (1 multiply-add = 1 flop)", lambda p: p.figures.flops / scale,
               result.original.flops / scale)]
    if result.has_latency:
        batch = min(r.batch_size for p in result.points for r in p.latency)
        originals = sorted(r.original.median_ms for p in result.points for r in p.latency if r.batch_size == batch)
        panels.append((f"latency at batch {batch}", "latency (ms per forward pass)",
                       lambda p: next(r.converted.median_ms for r in p.latency if r.batch_size == batch),
                       originals[len(originals) // 2]))
    for ax, (what, label, x_of, original_x) in zip(axes, panels):
        if result.original_top1 is not None:
            ax.plot([original_x], [100 * result.original_top1], marker="*", markersize=12, color=ORIGINAL,
                    linestyle="", label="original")
        for (fusion, hidden), points in series.items():
            done = [p for p in points if p.accuracy is not None]
            xs, ys = [x_of(p) for p in done], [100 * p.accuracy.top1 for p in done]
            ax.plot(xs, ys, marker="o", color=colors[fusion, hidden], label=f"fusion {fusion}, hidden {hidden}")
            for p, x, y in zip(done, xs, ys):
                ax.annotate(f"{p.gamma:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        epochs = max(p.accuracy.epochs for p in result.points if p.accuracy)
        ax.set_title(f"Top-1 against {what} (calibrated" + (f", {epochs} epoch(s) distilled)" if epochs else ")"))
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 on the validation images (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def plot_format(path) -> str:
    """The format ``path``'s suffix names ("jpg" for x.jpg; "png" without a suffix), or an
    OutputError where it names none matplotlib writes."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if not suffix:
        return "png"
    if suffix not in FORMATS:
        raise OutputError(f"a plot cannot be written as .{suffix} ({path}).",
                          f"name the plot file with one of the suffixes {', '.join('.' + f for f in FORMATS)}")
    return suffix


def _format(target, format: str | None) -> str:
    return format or (plot_format(target) if isinstance(target, (str, os.PathLike)) else "png")


def plot_report(report, target, format: str | None = None) -> None:
    """A bar chart per FIGURES entry with a ``plot`` panel (GFLOPs, memory traffic in MB),
    one bar pair per converted stage."""
    rows = [row for row in report.stages if row.converted]
    panels = [f for f in FIGURES if f.plot]
    fig = Figure(figsize=(max(7.0, 1.3 * len(rows) + 4), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    opts = ", ".join(f"{k}={v}" for k, v in report.options.items() if v is not None)
    fig.suptitle(f"CSP conversion per stage ({opts})" if opts else "CSP conversion per stage", fontsize=13)
    names = [row.name for row in rows]
    for ax, figure in zip(axes, panels):
        ylabel, title = figure.plot
        scale, prefix = scale_of(max((getattr(row.before, figure.key) for row in rows), default=0))
        ylabel = ylabel.format(prefix)
        before = [getattr(row.before, figure.key) / scale for row in rows]
        after = [getattr(row.after, figure.key) / scale for row in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], before, 0.4, label="original", color=ORIGINAL)
        bars = ax.bar([i + 0.2 for i in x], after, 0.4, label="converted", color=CONVERTED)
        for bar, b, a in zip(bars, before, after):
            ax.annotate(f"-{100 * (b - a) / b:.0f}%" if b else "", (bar.get_x() + bar.get_width() / 2, a),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(x), names, rotation=20 if max(map(len, names), default=0) > 8 else 0, ha="right"
                      if max(map(len, names), default=0) > 8 else "center")
        ax.set_title(title)
        ax.set_xlabel("stage")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(target, format=_format(target, format), dpi=110)


def plot_sweep(result, target, format: str | None = None) -> None:
    """GFLOPs against gamma, one line per (fusion, hidden); latency against gamma beside it when
    timed; where the points were scored on data, a second row: top-1 against flops (and
    against latency when timed), each point labelled with its gamma."""
    timed, scored = result.has_latency, result.has_accuracy
    columns = 2 if timed else 1
    fig = Figure(figsize=(11 if timed else 6.5, 9 if scored else 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2 if scored else 1, columns, squeeze=False)
    axes = grid[0]
    fig.suptitle("CSP sweep: cost against gamma (fraction of channels that bypass each stage)", fontsize=12)
    series = {}
    for p in sorted(result.points, key=lambda p: (p.fusion, p.hidden, p.gamma)):
        if p.figures is not None:
            series.setdefault((p.fusion, p.hidden), []).append(p)
    colors = {key: SERIES[i % len(SERIES)] for i, key in enumerate(series)}
    scale, unit = _scale(result.original.flops, "FLOPs")
    ax = axes[0]
    ax.axhline(result.original.flops / scale, color=ORIGINAL, linestyle="--", label="original")
    for (fusion, hidden), points in series.items():
        ax.plot([p.gamma for p in points], [p.figures.flops / scale for p in points], marker="o",
                color=colors[fusion, hidden], label=f"fusion {fusion}, hidden {hidden}")
    ax.set_title("Compute")
    ax.set_xlabel("gamma (bypass fraction)")
    ax.set_ylabel(f"{unit} (1 multiply-add = 1 flop)")
    ax.legend()
    ax.grid(alpha=0.3)
    if timed:
        ax = axes[1]
        batches = sorted({r.batch_size for p in result.points for r in p.latency})
        styles = ("-", ":", "-.", "--")
        for (fusion, hidden), points in series.items():
            for i, b in enumerate(batches):
                xs, ys = [], []
                for p in points:
                    for r in p.latency:
                        if r.batch_size == b:
                            xs.append(p.gamma)
                            ys.append(r.converted.median_ms)
                ax.plot(xs, ys, marker="o", color=colors[fusion, hidden], linestyle=styles[i % len(styles)],
                        label=f"fusion {fusion}, hidden {hidden}, batch {b}")
        for i, b in enumerate(batches):
            originals = sorted(r.original.median_ms for p in result.points for r in p.latency if r.batch_size == b)
            ax.axhline(originals[len(originals) // 2], color=ORIGINAL, linestyle=("--", ":", "-.")[i % 3],
                       label=f"original, batch {b} (median of its runs)")
        ax.set_title(f"Latency on {result.device} ({result.threads} thread(s), median)")
        ax.set_xlabel("gamma (bypass fraction)")
        ax.set_ylabel("latency (ms per forward pass)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if scored:
        _accuracy_panels(result, grid[1], series, colors, scale, unit)
    fig.savefig(target, format=_format(target, format), dpi=110)
