"""The Report: totals and one row per stage, original against converted.

    report = compare(model, csp, x)
    print(report)                 # a table
    report.to_dict()              # JSON-able, integers for every count
    report.to_markdown()          # the same content for a pull request, with a diagram per stage

Beside flops, params and memory traffic, the report shows HarDNet's CIO (conv input plus
output feature maps, bytes), the peak activation memory from tensor lifetimes (bytes;
measured on CUDA only), and the computational bottleneck (largest layer flops, and the
largest over the mean of a stage's layers). Rows and totals come from two Measurements; which nodes belong to which stage comes from
the record ``convert`` leaves on the converted GraphModule (``cspify.record.Conversion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from cspify.measure import FLOP_NOTE, Figures, Measurement
from cspify.record import Conversion

KEYS = ("flops", "params", "activations", "memory_bytes")
# Every figure a stage row and the totals carry (KEYS first: existing JSON keys stay).
FIGURE_KEYS = KEYS + ("cio_bytes", "peak_bytes", "max_layer_flops", "layer_balance")
MEMORY_NOTE = (
    "memory traffic = bytes each op reads and writes; CIO = bytes of conv input plus output feature maps; "
    "peak = activation bytes alive at once, from tensor lifetimes in the traced graph; "
    "layer max/mean = largest conv/linear flops over the mean (1.0 is even)"
)


@dataclass
class StageRow:
    name: str
    kind: str
    channels: int
    bypass_channels: int
    converted: bool
    reason: str
    before: Figures
    after: Figures
    notes: list[str] = field(default_factory=list)
    through_channels: int = 0
    base: str = ""
    blocks: int = 0
    gamma: float | None = None
    hidden: str = ""
    time_before_ms: float | None = None  # objective latency: whole model, without this stage / with it
    time_after_ms: float | None = None

    def to_dict(self) -> dict:
        row = {
            "name": self.name,
            "kind": self.kind,
            "channels": self.channels,
            "bypass_channels": self.bypass_channels,
            "converted": self.converted,
            "reason": self.reason,
        }
        before, after = self.before.to_dict(), self.after.to_dict()
        for key in FIGURE_KEYS:
            row[f"{key}_before"] = before[key]
            row[f"{key}_after"] = after[key]
        row["notes"] = list(self.notes)
        row.update(gamma=self.gamma, hidden=self.hidden, time_before_ms=self.time_before_ms,
                   time_after_ms=self.time_after_ms)
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

    def to_dict(self) -> dict:
        return {
            "original": {k: int(getattr(self.original, k)) for k in KEYS},
            "converted": {k: int(getattr(self.converted, k)) for k in KEYS},
            "figures": {"original": self.original.to_dict(), "converted": self.converted.to_dict()},
            "saved_percent": {
                k: round(saved(getattr(self.original, k), getattr(self.converted, k)), 2) for k in FIGURE_KEYS
            },
            "options": dict(self.options),
            "stages": [row.to_dict() for row in self.stages],
            "flop_note": self.flop_note,
            "kept_whole": dict(self.kept_whole),
            "notes": list(self.notes),
        }

    def _tables(self, fmt: str) -> tuple[str, str, list[str]]:
        totals = [
            [label, human(getattr(self.original, k), unit), human(getattr(self.converted, k), unit),
             percent(getattr(self.original, k), getattr(self.converted, k))]
            for k, label, unit in (
                ("flops", "flops", ""), ("params", "params", ""),
                ("activations", "activations", ""), ("memory_bytes", "memory traffic", "B"),
                ("cio_bytes", "CIO", "B"), ("peak_bytes", "peak activations", "B"),
                ("max_layer_flops", "largest layer", ""),
            )
        ]
        totals.append(["layer max/mean", f"{self.original.layer_balance:.2f}", f"{self.converted.layer_balance:.2f}",
                       percent(self.original.layer_balance, self.converted.layer_balance)])
        measured = self.original.measured_peak_bytes, self.converted.measured_peak_bytes
        if None in measured:
            totals.append(["peak measured", "not measured", "not measured", "-"])
        else:
            totals.append(["peak measured", human(measured[0], "B"), human(measured[1], "B"), percent(*measured)])
        rows, skipped = [], []
        per_stage = "per stage" in (self.options.get("gamma"), self.options.get("hidden"))
        timed = any(row.time_before_ms is not None for row in self.stages if row.converted)
        for row in self.stages:
            if not row.converted:
                skipped.append(f"{row.name} ({row.kind}, {row.channels} ch): {row.reason}")
                continue
            rows.append([
                row.name, row.kind, f"{row.bypass_channels}/{row.channels}",
                *([f"{row.gamma:g} {row.hidden}" if row.gamma is not None else "-"] if per_stage else []),
                human(row.before.flops), human(row.after.flops), percent(row.before.flops, row.after.flops),
                human(row.before.params), human(row.after.params), percent(row.before.params, row.after.params),
                human(row.before.memory_bytes, "B"), human(row.after.memory_bytes, "B"),
                percent(row.before.memory_bytes, row.after.memory_bytes),
                *(_times(row) if timed else []),
            ])
        total_table = tabulate(totals, headers=["total", "original", "converted", "saved"], tablefmt=fmt,
                               colalign=("left", "right", "right", "right"))
        headers = ["stage", "kind", "bypass/ch", *(["gamma hidden"] if per_stage else []), "flops", "->", "saved",
                   "params", "->", "saved", "traffic", "->", "saved", *(["model ms", "->", "saved"] if timed else [])]
        stage_table = tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                               colalign=("left", "left", *["right"] * (len(headers) - 2))) if rows else ""
        if rows:
            memory = self._memory_table(fmt)
            if fmt == "simple":  # set apart under its own heading, indented below the first stage table
                memory = "memory and bottleneck per stage:\n" + "\n".join(f"  {line}" for line in memory.splitlines())
            stage_table += "\n\n" + memory
        notes = [f"{row.name}: {note}" for row in self.stages for note in row.notes]
        notes += [f"'{module}' kept whole ({why})" for module, why in self.kept_whole.items()]
        notes += self.notes
        return total_table, stage_table, skipped + [f"note: {n}" for n in notes]

    def _memory_table(self, fmt: str) -> str:
        """Per converted stage: CIO, peak activations, and the computational bottleneck."""
        rows = []
        for row in self.stages:
            if not row.converted:
                continue
            b, a = row.before, row.after
            rows.append([
                row.name,
                human(b.cio_bytes, "B"), human(a.cio_bytes, "B"), percent(b.cio_bytes, a.cio_bytes),
                human(b.peak_bytes, "B"), human(a.peak_bytes, "B"), percent(b.peak_bytes, a.peak_bytes),
                human(b.max_layer_flops), human(a.max_layer_flops), f"{b.layer_balance:.2f}", f"{a.layer_balance:.2f}",
            ])
        headers = ["stage", "CIO", "->", "saved", "peak act.", "->", "saved", "largest layer", "->", "max/mean", "->"]
        return tabulate(rows, headers=headers, tablefmt=fmt, colalign=("left", *["right"] * 10), disable_numparse=True)

    def __str__(self) -> str:
        totals, stages, lines = self._tables("simple")
        parts = [self._title(), "", totals]
        if stages:
            parts += ["", stages]
        if lines:
            parts += ["", "not converted / notes:"] + [f"  {line}" for line in lines]
        parts += ["", f"({self.flop_note}; {MEMORY_NOTE})"]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        totals, stages, lines = self._tables("github")
        parts = [f"## {self._title()}", "", totals, ""]
        if stages:
            parts += ["### Stages", "", stages, ""]
        diagrams = [stage_diagram(row, self.options.get("fusion", "last")) for row in self.stages if row.converted]
        if diagrams:
            parts += ["### Converted stages", ""]
            for row, diagram in zip([r for r in self.stages if r.converted], diagrams):
                parts += [f"**{row.name}** ({row.kind})", "", diagram, ""]
        if lines:
            parts += ["### Not converted and notes", ""] + [f"- {line}" for line in lines] + [""]
        parts += [f"_{self.flop_note}; {MEMORY_NOTE}._", ""]
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
        rows.append(StageRow(
            name=stage.name, kind=stage.kind, channels=stage.channels, bypass_channels=stage.bypass_channels,
            converted=stage.converted, reason=stage.reason, before=fig_before, after=fig_after,
            notes=list(stage.notes), through_channels=stage.through_channels, base=stage.base, blocks=stage.blocks,
            gamma=stage.gamma, hidden=stage.hidden, time_before_ms=stage.time_before_ms,
            time_after_ms=stage.time_after_ms,
        ))
    return Report(before.totals, after.totals, rows, record.summary() if record else {},
                  kept_whole=dict(record.kept_whole) if record else {}, notes=list(record.notes) if record else [])


def _times(row: StageRow) -> list[str]:
    """The whole model's measured ms without this stage and with it (objective latency)."""
    if row.time_before_ms is None or row.time_after_ms is None:
        return ["-", "-", "-"]
    return [f"{row.time_before_ms:.2f}", f"{row.time_after_ms:.2f}", percent(row.time_before_ms, row.time_after_ms)]


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
