"""The Report: rows from the conversion record, totals, the text, JSON and Markdown renderings."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import cspify
from cspify.measure import FIGURES, measure
from cspify.record import StageRecord, attach
from cspify.report import REASON_WIDTH, Report, StageRow, build_report, human, percent, saved, scale_of

from tiny_models import TinyDenseNet, TinyResNet, seeded


@pytest.fixture(scope="module")
def resnet():
    model = seeded(TinyResNet)
    x = torch.randn(1, 3, 16, 16)
    csp = cspify.convert(model, x, stages=["layer2"])
    return model, csp, x, cspify.compare(model, csp, x)


def test_one_row_per_stage_in_the_record_with_its_options(resnet):
    _, csp, _, report = resnet
    record = cspify.conversion_of(csp)
    assert [r.name for r in report.stages] == [s.name for s in record.stages] == ["layer1", "layer2"]
    layer1, layer2 = report.stages
    assert not layer1.converted and "filter" in layer1.reason and layer1.after == layer1.before
    assert layer2.converted and layer2.bypass_channels + layer2.through_channels == layer2.channels == 16
    assert layer2.after.flops < layer2.before.flops
    assert report.options == {"gamma": 0.5, "fusion": "last", "hidden": "keep"}


def test_totals_are_the_two_measurements(resnet):
    model, csp, x, report = resnet
    assert report.original == measure(model, x).totals
    assert report.converted == measure(csp, x).totals


def test_a_model_cspify_did_not_make_gives_totals_without_rows(resnet):
    model, _, x, _ = resnet
    report = build_report(measure(model, x), measure(model, x), None)
    assert report.stages == [] and report.options == {}
    assert "CSP conversion" in str(report) and "0.0%" in str(report)


def test_json_is_plain_data_with_integer_counts(resnet):
    data = json.loads(json.dumps(resnet[3].to_dict()))
    assert all(isinstance(v, int) for v in data["original"].values())
    assert data["stages"][1]["name"] == "layer2" and data["stages"][1]["converted"]
    assert data["saved_percent"]["flops"] == pytest.approx(
        saved(data["original"]["flops"], data["converted"]["flops"]), abs=0.01)


def test_text_lists_what_was_not_converted_and_why(resnet):
    text = str(resnet[3])
    left = text.split("not converted:\n")[1]
    assert left.splitlines()[0].split() == ["stage", "kind", "ch", "why", "not", "converted"]
    assert re.search(r"^  layer1\s+residual\s+8\s+not selected by the stage filter$", left, re.M)
    assert "layer2" in text.split("not converted")[0] and "layer2" not in left


def left_alone(*reasons: str, notes=()) -> Report:
    """A report of TinyResNet's stages, each left as it was for one of ``reasons``."""
    x = torch.randn(1, 3, 16, 16)
    model = seeded(TinyResNet)
    csp = cspify.convert(model, x, stages=["layer2"])
    report = cspify.compare(model, csp, x)
    report.stages = [StageRow(dataclasses.replace(row.record, converted=False, reason=reason), row.before, row.before)
                     for row, reason in zip(report.stages, reasons)]
    report.notes = list(notes)
    return report


INSIDE = ("it is already the through part of a cross stage partial block (its output joins 'getitem' in '{0}', split "
          "from '{0}.cv1.act', in 'cat' in '{0}'); name it with --stage to nest a second CSP in it")


def test_a_reason_shared_is_said_by_its_gist_and_wraps_in_its_column():
    reasons = [INSIDE.format("model.2"), INSIDE.format("model.4")]
    report = left_alone(*reasons, notes=["a note"])
    text = str(report)
    left = text.split("not converted:\n")[1].split("\n\n")[0].splitlines()
    assert len(left) == 6 and max(map(len, left)) <= 32 + REASON_WIDTH  # heading, rule, two reasons on two lines
    assert "its output joins" not in text and text.count("nest a second") == 2  # the gist: the details differ
    assert text.split("notes:\n")[1].startswith("  a note\n")
    assert [row["reason"] for row in report.to_dict()["stages"]] == reasons
    markdown = report.to_markdown()
    assert f"| layer1  | residual |    8 | {reasons[0]} |" in markdown and "### Notes\n\n- a note" in markdown


def test_a_reason_of_its_own_is_said_whole():
    reasons = [INSIDE.format("model.2"), "its conversion failed a check (it splits 'stem.2'), so it was left as it was"]
    text = " ".join(str(left_alone(*reasons)).split())  # the column wraps
    assert "its output joins 'getitem' in 'model.2'" in text and "(it splits 'stem.2')" in text


def test_the_report_names_modules_where_the_record_names_nodes():
    """torch.fx names a node of ``layer1.0.conv1`` ``layer1_0_conv1``: the report says the module."""
    x = torch.randn(1, 3, 16, 16)
    model = seeded(TinyResNet)
    csp = cspify.convert(model, x, stages=["layer2"])
    record = cspify.conversion_of(csp)
    node, meant = next((n.name, n.target) for n in csp.graph.nodes
                       if n.op == "call_module" and n.name in record.stages[0].nodes and n.name.startswith("layer1_0_"))
    changed = dataclasses.replace(record.stages[0], reason=f"'{node}' is made up for this test")
    attach(csp, dataclasses.replace(record, stages=(changed, *record.stages[1:])))
    report = cspify.compare(model, csp, x)
    assert report.stages[0].reason == f"'{meant}' is made up for this test" and "." in meant
    assert cspify.conversion_of(csp).stages[0].reason == f"'{node}' is made up for this test"


def test_markdown_has_a_diagram_per_converted_stage():
    model = seeded(TinyDenseNet)
    x = torch.randn(1, 3, 16, 16)
    for fusion in ("last", "first"):
        report = cspify.compare(model, cspify.convert(model, x, fusion=fusion, allow_costlier=True), x)
        markdown = report.to_markdown()
        assert markdown.count("```mermaid") == sum(r.converted for r in report.stages) > 0
        assert ("partial transition<br/>" in markdown) == (fusion == "last")


def test_numbers_are_written_with_si_prefixes():
    assert scale_of(4.11e9) == (1e9, "G") and scale_of(12) == (1.0, "")
    assert human(4_110_000_000) == "4.11G" and human(999, "B") == "999B" and human(1500, "B") == "1.50KB"
    assert percent(200, 150) == "25.0%" and percent(100, 110) == "-10.0%" and percent(0, 5) == "-"


def test_report_carries_the_new_figures_per_stage_and_in_total():
    model = seeded(TinyResNet)
    x = torch.randn(1, 3, 16, 16)
    report = cspify.compare(model, cspify.convert(model, x), x)
    data = report.to_dict()
    for key in ("flops", "params", "activations", "memory_bytes", "cio_bytes", "peak_bytes", "max_layer_flops"):
        assert data["figures"]["original"][key] > 0 and key in data["saved_percent"]
    assert set(data["original"]) == {"flops", "params", "activations", "memory_bytes"}  # kept as they were
    assert data["figures"]["original"]["measured_peak_bytes"] is None
    for row in data["stages"]:
        assert {"flops_before", "memory_bytes_after", "cio_bytes_before", "cio_bytes_after", "peak_bytes_after",
                "max_layer_flops_before", "layer_balance_after"} <= set(row)
        if row["converted"]:
            assert row["cio_bytes_after"] < row["cio_bytes_before"]
            assert row["layer_balance_before"] >= 1.0
    text = str(report)
    assert "CIO" in text and "peak activations" in text and "not measured" in text and "max/mean" in text
    markdown = report.to_markdown()
    assert markdown.count("```mermaid") == sum(r.converted for r in report.stages)
    assert "partial transition" in markdown and "bypass 4 ch" in markdown


def test_a_row_reads_its_stage_through_the_record(resnet):
    _, csp, _, report = resnet
    layer2 = report.stages[1]
    assert layer2.record is cspify.conversion_of(csp).stages[1]
    assert (layer2.name, layer2.kind, layer2.channels) == (layer2.record.name, "residual", 16)
    with pytest.raises(AttributeError):
        layer2.no_such_field


def test_json_per_stage_keys_are_the_shown_record_fields_and_the_figures(resnet):
    row = resnet[3].to_dict()["stages"][1]
    figures = [f"{f.key}_{when}" for f in FIGURES if f.per_stage for when in ("before", "after")]
    assert list(row) == ["name", "kind", "channels", "bypass_channels", "converted", "reason", *figures,
                         "notes", "gamma", "hidden", "time_before_ms", "time_after_ms"]
    assert "measured_peak_bytes_before" not in row and isinstance(row["notes"], list)


def test_a_new_record_field_reads_through_the_row_but_stays_out_of_the_json(resnet):
    """A StageRecord field is one edit: the row reads it; the JSON shows it only when named there."""
    stage = resnet[3].stages[1]
    Longer = dataclasses.make_dataclass("Longer", [("calibrated", float, 0.25)], bases=(StageRecord,), frozen=True)
    longer = StageRow(Longer(**dataclasses.asdict(stage.record)), stage.before, stage.after)
    assert longer.calibrated == 0.25 and longer.name == stage.name
    assert longer.to_dict() == stage.to_dict()


def test_totals_show_one_row_per_figure_in_its_unit(resnet):
    report = resnet[3]
    totals = str(report).split("\n\n")[1].splitlines()[2:]
    assert [line[:16].strip() for line in totals] == [f.label for f in FIGURES]
    assert f"{report.original.layer_balance:.2f}" in totals[[f.key for f in FIGURES].index("layer_balance")]
    assert human(report.original.memory_bytes, "B") in totals[[f.key for f in FIGURES].index("memory_bytes")]
