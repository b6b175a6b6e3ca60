"""The Report: totals and one row per stage, original against converted.

    report = compare(model, csp, x)
    print(report)                 # a table
    report.to_dict()              # JSON-able, integers for every count
    report.to_markdown()          # the same content for a pull request

Rows and totals come from two Measurements; which nodes belong to which stage comes from
the metadata ``convert`` leaves on the converted GraphModule (``gm.meta["cspify"]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from cspify.measure import FLOP_NOTE, Figures, Measurement

KEYS = ("flops", "params", "activations", "memory_bytes")


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

    def to_dict(self) -> dict:
        row = {
            "name": self.name,
            "kind": self.kind,
            "channels": self.channels,
            "bypass_channels": self.bypass_channels,
            "converted": self.converted,
            "reason": self.reason,
        }
        for key in KEYS:
            row[f"{key}_before"] = getattr(self.before, key)
            row[f"{key}_after"] = getattr(self.after, key)
        row["notes"] = list(self.notes)
        return row


@dataclass
class Report:
    original: Figures
    converted: Figures
    stages: list[StageRow]
    options: dict = field(default_factory=dict)
    flop_note: str = FLOP_NOTE

    def to_dict(self) -> dict:
        return {
            "original": self.original.to_dict(),
            "converted": self.converted.to_dict(),
            "saved_percent": {k: round(saved(getattr(self.original, k), getattr(self.converted, k)), 2) for k in KEYS},
            "options": dict(self.options),
            "stages": [row.to_dict() for row in self.stages],
            "flop_note": self.flop_note,
        }

    def _tables(self, fmt: str) -> tuple[str, str, list[str]]:
        totals = [
            [label, human(getattr(self.original, k), unit), human(getattr(self.converted, k), unit),
             percent(getattr(self.original, k), getattr(self.converted, k))]
            for k, label, unit in (
                ("flops", "flops", ""), ("params", "params", ""),
                ("activations", "activations", ""), ("memory_bytes", "memory traffic", "B"),
            )
        ]
        rows, skipped = [], []
        for row in self.stages:
            if not row.converted:
                skipped.append(f"{row.name} ({row.kind}, {row.channels} ch): {row.reason}")
                continue
            rows.append([
                row.name, row.kind, f"{row.bypass_channels}/{row.channels}",
                human(row.before.flops), human(row.after.flops), percent(row.before.flops, row.after.flops),
                human(row.before.params), human(row.after.params), percent(row.before.params, row.after.params),
                human(row.before.memory_bytes, "B"), human(row.after.memory_bytes, "B"),
                percent(row.before.memory_bytes, row.after.memory_bytes),
            ])
        total_table = tabulate(totals, headers=["total", "original", "converted", "saved"], tablefmt=fmt,
                               colalign=("left", "right", "right", "right"))
        headers = ["stage", "kind", "bypass/ch", "flops", "->", "saved", "params", "->", "saved",
                   "traffic", "->", "saved"]
        stage_table = tabulate(rows, headers=headers, tablefmt=fmt,
                               colalign=("left", "left", "right", *["right"] * 9)) if rows else ""
        notes = [f"{row.name}: {note}" for row in self.stages for note in row.notes]
        return total_table, stage_table, skipped + [f"note: {n}" for n in notes]

    def __str__(self) -> str:
        totals, stages, lines = self._tables("simple")
        parts = [self._title(), "", totals]
        if stages:
            parts += ["", stages]
        if lines:
            parts += ["", "not converted / notes:"] + [f"  {line}" for line in lines]
        parts += ["", f"({self.flop_note}; memory traffic = bytes each op reads and writes)"]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        totals, stages, lines = self._tables("github")
        parts = [f"## {self._title()}", "", totals, ""]
        if stages:
            parts += ["### Stages", "", stages, ""]
        if lines:
            parts += ["### Not converted and notes", ""] + [f"- {line}" for line in lines] + [""]
        parts += [f"_{self.flop_note}; memory traffic is the bytes each op reads and writes._", ""]
        return "\n".join(parts)

    def _title(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items() if v is not None)
        return f"CSP conversion ({opts})" if opts else "CSP conversion"


def build_report(before: Measurement, after: Measurement, meta: dict | None) -> Report:
    """Totals of both models, and a row per stage the conversion metadata names."""
    rows = []
    for stage in (meta or {}).get("stages", []):
        nodes_before = stage["nodes"]
        nodes_after = list(stage["nodes"]) + list(stage["added"])
        fig_before = before.stage(nodes_before)
        fig_after = after.stage(nodes_after) if stage["converted"] else fig_before
        rows.append(StageRow(
            name=stage["name"], kind=stage["kind"], channels=stage["channels"],
            bypass_channels=stage["bypass_channels"], converted=stage["converted"],
            reason=stage["reason"], before=fig_before, after=fig_after, notes=stage["notes"],
        ))
    return Report(before.totals, after.totals, rows, dict((meta or {}).get("options", {})))


def saved(before: int, after: int) -> float:
    return 100.0 * (before - after) / before if before else 0.0


def percent(before: int, after: int) -> str:
    return f"{saved(before, after):+.1f}%".replace("+", "") if before else "-"


def human(value: int, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value}{unit}"
