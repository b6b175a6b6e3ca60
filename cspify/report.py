"""The Report: totals and one row per stage, original against converted.

    report = compare(model, csp, x)
    print(report)                 # a table
    report.to_dict()              # JSON-able, integers for every count
    report.to_markdown()          # the same content for a pull request, with a diagram per stage

Beside flops, params and memory traffic, the report shows HarDNet's CIO (conv input plus
output feature maps, bytes), the peak activation memory from tensor lifetimes (bytes;
measured on CUDA only), and the computational bottleneck (largest layer flops, and the
largest over the mean of a stage's layers). Each figure's row, columns, unit and note come
from its entry in ``cspify.measure.FIGURES``. Rows and totals come from two Measurements;
which nodes belong to which stage comes from the record ``convert`` leaves on the converted
GraphModule (``cspify.record.Conversion``); a row reads its stage's fields through that
record (``StageRow.record``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from cspify.measure import FIGURES, FLOP_NOTE, FigureSpec, Figures, Measurement
from cspify.reasons import brief
from cspify.record import Conversion, StageRecord

# The whole-model counts the JSON's "original" and "converted" carried from the start (integers);
# every figure is under "figures", and per stage beside the record's fields.
KEYS = ("flops", "params", "activations", "memory_bytes")
# The StageRecord fields a stage's JSON shows, before its figures and after them: a field
# the JSON should show is one more name here.
RECORD_FIELDS = ("name", "kind", "channels", "bypass_channels", "converted", "reason")
RECORD_FIELDS_AFTER = ("notes", "gamma", "hidden", "time_before_ms", "time_after_ms")
FIGURE_NOTE = "; ".join(f.note for f in FIGURES if f.note)
REGION_FIGURES = ("flops", "memory_bytes", "cio_bytes", "peak_bytes")  # the per-part table, then its largest layer
REASON_WIDTH = 72  # the text table's reason column wraps at this many characters


@dataclass
class StageRow:
    """A stage in the report: its conversion record and its figures before and after.
    The record's fields read through the row (``row.name``, ``row.kind``, ``row.channels``...)."""

    record: StageRecord
    before: Figures
    after: Figures

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("record", "before", "after"):  # copy and pickle look early
            raise AttributeError(name)
        return getattr(self.record, name)

    def to_dict(self) -> dict:
        row = {key: plain(getattr(self.record, key)) for key in RECORD_FIELDS}
        before, after = self.before.to_dict(), self.after.to_dict()
        for f in FIGURES:
            if f.per_stage:
                row[f"{f.key}_before"] = before[f.key]
                row[f"{f.key}_after"] = after[f.key]
        row.update((key, plain(getattr(self.record, key))) for key in RECORD_FIELDS_AFTER)
        return row


@dataclass
class Report:
    original: Figures
    converted: Figures
    stages: list[StageRow]
    options: dict = field(default_factory=dict)
    flop_note: str = FLOP_NOTE
    kept_whole: dict[str, str] = field(default_factory=dict)  # submodules tracing kept whole, and why
    notes: list[str] = field(default_factory=list)  # what a budget or objective measured and chose
    regions: list = field(default_factory=list)  # a detector's parts (cspify.regions.Region), where its layout is known

    def to_dict(self) -> dict:
        return {
            "original": {k: int(getattr(self.original, k)) for k in KEYS},
            "converted": {k: int(getattr(self.converted, k)) for k in KEYS},
            "figures": {"original": self.original.to_dict(), "converted": self.converted.to_dict()},
            "saved_percent": {
                f.key: round(saved(getattr(self.original, f.key), getattr(self.converted, f.key)), 2)
                for f in FIGURES if f.per_stage
            },
            "options": dict(self.options),
            "stages": [row.to_dict() for row in self.stages],
            "flop_note": self.flop_note,
            "kept_whole": dict(self.kept_whole),
            "notes": list(self.notes),
            "regions": [region.to_dict() for region in self.regions],
        }

    def _tables(self, fmt: str) -> tuple[str, str, str, list[str]]:
        """The totals, the converted stages (with their memory table), the stages left and
        why (in text, a reason stages refused alike share said by its gist; all of it in
        Markdown), and the notes."""
        totals = [[f.label, *cells(f, self.original, self.converted)] for f in FIGURES]
        rows = []
        left = [row for row in self.stages if not row.converted]
        reasons = [row.reason for row in left]
        skipped = [[row.name, row.kind, str(row.channels), why]
                   for row, why in zip(left, brief(reasons) if fmt == "simple" else reasons)]
        per_stage = "per stage" in (self.options.get("gamma"), self.options.get("hidden"))
        timed = any(row.time_before_ms is not None for row in self.stages if row.converted)
        columns = [f for f in FIGURES if f.table == "stages"]
        for row in self.stages:
            if not row.converted:
                continue
            rows.append([
                row.name, row.kind, f"{row.bypass_channels}/{row.channels}",
                *([f"{row.gamma:g} {row.hidden}" if row.gamma is not None else "-"] if per_stage else []),
                *(cell for f in columns for cell in cells(f, row.before, row.after, f.saved)),
                *(_times(row) if timed else []),
            ])
        total_table = tabulate(totals, headers=["total", "original", "converted", "saved"], tablefmt=fmt,
                               colalign=("left", "right", "right", "right"))
        headers = ["stage", "kind", "bypass/ch", *(["gamma hidden"] if per_stage else []), *headings(columns),
                   *(["model ms", "->", "saved"] if timed else [])]
        stage_table = tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                               colalign=("left", "left", *["right"] * (len(headers) - 2))) if rows else ""
        if rows:
            memory = self._memory_table(fmt)
            if fmt == "simple":  # set apart under its own heading, indented below the first stage table
                memory = "memory and bottleneck per stage:\n" + "\n".join(f"  {line}" for line in memory.splitlines())
            stage_table += "\n\n" + memory
        left = tabulate(skipped, headers=["stage", "kind", "ch", "why not converted"], tablefmt=fmt,
                        disable_numparse=True, colalign=("left", "left", "right", "left"),
                        maxcolwidths=[None, None, None, REASON_WIDTH if fmt == "simple" else None]) if skipped else ""
        notes = [f"{row.name}: {note}" for row in self.stages for note in row.notes]
        notes += [f"'{module}' kept whole ({why})" for module, why in self.kept_whole.items()]
        notes += self.notes
        return total_table, stage_table, left, notes

    def _regions_table(self, fmt: str) -> str:
        """Per part of a detector (backbone, neck, head): its figures and its largest layer."""
        columns = [f for f in FIGURES if f.key in REGION_FIGURES]
        rows = [[r.name, *(cell for f in columns for cell in cells(f, r.before, r.after, f.saved)),
                 human(r.largest_before[1]), human(r.largest_after[1]), percent(r.largest_before[1], r.largest_after[1]),
                 r.largest_after[0] or "-"] for r in self.regions]
        headers = ["part", *headings(columns), "largest layer", "->", "saved", "which, after"]
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                        colalign=("left", *["right"] * (len(headers) - 2), "left"))

    def _memory_table(self, fmt: str) -> str:
        """Per converted stage: CIO, peak activations, and the computational bottleneck."""
        columns = [f for f in FIGURES if f.table == "memory"]
        rows = [[row.name, *(cell for f in columns for cell in cells(f, row.before, row.after, f.saved))]
                for row in self.stages if row.converted]
        headers = ["stage", *headings(columns)]
        return tabulate(rows, headers=headers, tablefmt=fmt, colalign=("left", *["right"] * (len(headers) - 1)),
                        disable_numparse=True)

    def __str__(self) -> str:
        totals, stages, left, notes = self._tables("simple")
        parts = [self._title(), "", totals]
        if stages:
            parts += ["", stages]
        if self.regions:
            parts += ["", "per part:"] + [f"  {line}" for line in self._regions_table("simple").splitlines()]
        if left:
            parts += ["", "not converted:"] + [f"  {line}" for line in left.splitlines()]
        if notes:
            parts += ["", "notes:"] + [f"  {line}" for line in notes]
        parts += ["", f"({self.flop_note}; {FIGURE_NOTE})"]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        totals, stages, left, notes = self._tables("github")
        parts = [f"## {self._title()}", "", totals, ""]
        if stages:
            parts += ["### Stages", "", stages, ""]
        diagrams = [stage_diagram(row, self.options.get("fusion", "last")) for row in self.stages if row.converted]
        if diagrams:
            parts += ["### Converted stages", ""]
            for row, diagram in zip([r for r in self.stages if r.converted], diagrams):
                parts += [f"**{row.name}** ({row.kind})", "", diagram, ""]
        if self.regions:
            parts += ["### Per part", "", self._regions_table("github"), ""]
        if left:
            parts += ["### Not converted", "", left, ""]
        if notes:
            parts += ["### Notes", ""] + [f"- {line}" for line in notes] + [""]
        parts += [f"_{self.flop_note}; {FIGURE_NOTE}._", ""]
        return "\n".join(parts)

    def _title(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items() if v is not None)
        return f"CSP conversion ({opts})" if opts else "CSP conversion"


def build_report(before: Measurement, after: Measurement, record: Conversion | None) -> Report:
    """Totals of both models, and a row per stage the conversion record names."""
    rows = []
    for stage in record.stages if record else ():
        fig_before = before.stage(stage.nodes)
        fig_after = after.stage(stage.nodes + stage.added) if stage.converted else fig_before
        rows.append(StageRow(stage, fig_before, fig_after))
    return Report(before.totals, after.totals, rows, record.summary() if record else {},
                  kept_whole=dict(record.kept_whole) if record else {}, notes=list(record.notes) if record else [])


def _times(row: StageRow) -> list[str]:
    """The whole model's measured ms without this stage and with it (objective latency)."""
    if row.time_before_ms is None or row.time_after_ms is None:
        return ["-", "-", "-"]
    return [f"{row.time_before_ms:.2f}", f"{row.time_after_ms:.2f}", percent(row.time_before_ms, row.time_after_ms)]


def cells(figure: FigureSpec, before: Figures, after: Figures, with_saved: bool = True) -> list[str]:
    """A figure before and after, shown in its unit, and what was saved (``with_saved``)."""
    b, a = getattr(before, figure.key), getattr(after, figure.key)
    if b is None or a is None:
        return ["not measured", "not measured", *(["-"] if with_saved else [])]
    return [shown(figure, b), shown(figure, a), *([percent(b, a)] if with_saved else [])]


def headings(figures: list[FigureSpec]) -> list[str]:
    """The column headings of some figures in a per-stage table: before, after (, saved)."""
    return [h for f in figures for h in (f.column, "->", *(["saved"] if f.saved else []))]


def shown(figure: FigureSpec, value: float) -> str:
    """One value in the figure's unit: SI prefixes for counts and bytes, two decimals for a ratio."""
    return f"{value:.2f}" if figure.unit == "ratio" else human(value, figure.unit)


def plain(value):
    """A record field as JSON: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def stage_diagram(row: StageRow, fusion: str = "last") -> str:
    """A mermaid flowchart of one converted stage: base, split, blocks, transition, concat.

        print(stage_diagram(report.stages[0]))    # a ```mermaid block GitHub and GitLab render
    """
    through = row.through_channels or row.channels - row.bypass_channels
    blocks = f"{row.blocks} narrowed blocks" if row.blocks else "narrowed blocks"
    lines = [
        "```mermaid",
        "flowchart LR",
        f'  base["base {row.base or row.name}<br/>{row.channels} ch"] --> split{{{{"split"}}}}',
        f'  split -- "bypass {row.bypass_channels} ch" --> concat(("concat"))',
        f'  split -- "through {through} ch" --> blocks["{blocks}<br/>{row.kind}"]',
    ]
    if fusion == "first":
        lines += ['  blocks --> concat', '  concat --> transition["transition<br/>1x1 conv, norm, act"]',
                  f'  transition --> out["{row.name} output"]']
    else:
        lines += ['  blocks --> transition["partial transition<br/>1x1 conv, norm, act"]',
                  '  transition --> concat', f'  concat --> out["{row.name} output"]']
    return "\n".join(lines + ["```"])


def saved(before: int, after: int) -> float:
    return 100.0 * (before - after) / before if before else 0.0


def percent(before: float, after: float) -> str:
    return f"{saved(before, after):+.1f}%".replace("+", "") if before else "-"


def scale_of(value: float) -> tuple[float, str]:
    """The divisor and SI prefix that keep ``value`` between 1 and 1000: (1e6, "M")."""
    for divisor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= divisor:
            return divisor, prefix
    return 1.0, ""


def human(value: int, unit: str = "") -> str:
    divisor, prefix = scale_of(value)
    return f"{value / divisor:.2f}{prefix}{unit}" if prefix else f"{value}{unit}"
