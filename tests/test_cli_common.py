"""The layer every command stands on (cspify.cli.options, cspify.cli.run): one set of option
declarations, one load-convert-measure step, one all-or-nothing writer for every command's files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cspify.cli import main
from cspify.cli.run import Progress, load_convert_measure
from cspify.errors import OutputError
from cspify.files import Outputs
from cspify.rules import DESCRIPTIONS, KINDS
from test_cli import RESNET, SMALL, TINY_RES, check_error, cli, listing, models, work  # noqa: F401

SHARED = ["--stage", "--allow-costlier", "--weights", "--input-shape", "--scope", "--leaf", "--json", "--markdown",
          "--force", "--quiet", "--debug"]


def declarations(command: str) -> dict:
    """Option -> (help text, metavar, multiple, is_flag) of one command."""
    params = main.commands[command].params
    return {opt: (p.help, p.metavar, p.multiple, getattr(p, "is_flag", False))
            for p in params for opt in p.opts if opt.startswith("--")}


def test_every_command_declares_the_shared_options_alike():
    convert = declarations("convert")
    for command in ("analyze", "bench", "sweep"):
        theirs = declarations(command)
        for option in SHARED:
            if option in ("--json", "--markdown") and command == "sweep":
                assert theirs[option][0] == convert[option][0].replace("report", "sweep")
                continue
            assert theirs[option] == convert[option], f"{command} {option}"
    for command in ("convert", "analyze", "bench"):
        assert {"--gamma", "--fusion", "--hidden", "--seed"} <= set(declarations(command))
    assert "--plot" in declarations("sweep") and "--plot" not in declarations("analyze")


def test_load_convert_measure_is_the_one_step(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_RES)
    options = dict(model=str(path), weights=None, input_shape=None, scope=None, leaves=(), seed=0, gamma="0.5",
                   fusion="last", hidden="keep", stages=(), allow_costlier=False, kinds=None, round_to="1",
                   split="last")
    done = load_convert_measure(options, Progress(quiet=True))
    assert [tuple(x.shape) for x in done.inputs] == [(1, 3, 16, 16)]
    assert done.report.converted.flops < done.report.original.flops
    with torch.no_grad():
        assert done.csp(*done.inputs).shape == done.model(*done.inputs).shape


def test_bench_writes_its_files_all_or_none(work, models, monkeypatch):
    """The Markdown fails after the JSON was staged: neither lands, nothing hidden is left."""
    from cspify.bench import BenchResult

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BenchResult, "to_markdown", broken)
    path = models("tiny.py", TINY_RES)
    before = listing(work)
    result = cli("bench", path, "--min-run-time", "0.001", "--rounds", "1", "--threads", "1", "--device", "cpu",
                 "--json", "b.json", "--markdown", "b.md", "-q")
    check_error(result, 6, before, work, "b.md", "No space left")


def test_sweep_writes_its_files_all_or_none(work, models, monkeypatch):
    def broken(result, f, *format):
        raise RuntimeError("matplotlib broke")

    import cspify.plot

    working = cspify.plot.plot_sweep
    monkeypatch.setattr(cspify.plot, "plot_sweep", broken)
    path = models("tiny.py", TINY_RES)
    result = cli("sweep", path, "--gammas", "0.5", "--json", "s.json", "--markdown", "s.md", "--plot", "s.png", "-q")
    assert result.exit_code == 1 and "matplotlib broke" in result.stderr
    assert listing(work) == [], "a failed plot left the sweep's other files behind"
    monkeypatch.setattr(cspify.plot, "plot_sweep", working)
    result = cli("sweep", path, "--gammas", "0.5", "--json", "s.json", "--markdown", "s.md", "-q")
    assert result.exit_code == 0, result.output
    assert listing(work) == ["s.json", "s.md"] and json.loads((work / "s.json").read_text())["points"]
    assert result.stdout.endswith("\n\nsaved the sweep as JSON to s.json\nsaved the sweep as Markdown to s.md\n")


def test_sweep_refuses_an_existing_output_before_converting(work, models):
    (work / "s.json").write_text("{}")
    before = listing(work)
    result = cli("sweep", models("tiny.py", TINY_RES), "--gammas", "0.5", "--json", "s.json")
    check_error(result, 6, before, work, "s.json", "--force", quiet=False)
    assert "loading" not in result.stderr and os.path.getsize(work / "s.json") == 2


def test_every_file_written_says_where_it_went(work):
    result = cli("convert", RESNET, *SMALL, "-o", "m.pt", "--json", "r.json", "--markdown", "r.md", "--plot", "p.png",
                 "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n\nsaved the converted model to m.pt\nsaved the report as JSON to r.json\n"
                                  "saved the report as Markdown to r.md\nsaved the plot of its stages to p.png\n")
    assert listing(work) == ["m.pt", "p.png", "r.json", "r.md"]
    assert (work / "p.png").read_bytes()[:4] == b"\x89PNG"
    result = cli("analyze", RESNET, *SMALL, "--json", "a.json", "-q")
    assert result.exit_code == 0 and result.stdout.endswith("\n\nsaved the report as JSON to a.json\n")


@pytest.mark.parametrize("command, name, magic", [
    ("convert", "p.jpg", b"\xff\xd8\xff"), ("convert", "p.PDF", b"%PDF"), ("sweep", "s.jpeg", b"\xff\xd8\xff"),
], ids=["convert-jpg", "convert-pdf", "sweep-jpeg"])
def test_a_plot_is_written_in_the_format_its_suffix_names(work, command, name, magic):
    args = ["--gammas", "0.5"] if command == "sweep" else []
    result = cli(command, RESNET, *SMALL, *args, "--plot", name, "-q")
    assert result.exit_code == 0, result.output
    assert listing(work) == [name] and (work / name).read_bytes().startswith(magic)
    assert f"to {name}" in result.stdout.splitlines()[-1]


def test_sweep_refuses_a_plot_suffix_before_loading(work, models):
    result = cli("sweep", models("tiny.py", TINY_RES), "--gammas", "0.5", "--plot", "s.bmp")
    check_error(result, 6, [], work, "cannot be written as .bmp", quiet=False)
    assert "loading" not in result.stderr


def test_outputs_refuse_a_second_target_at_a_path_staged_already(work):
    with pytest.raises(OutputError, match="two outputs would both write"):
        with Outputs() as out:
            out.file("r.json", lambda f: f.write("{}"))
            out.file("./r.json", lambda f: f.write("[]"))
    assert listing(work) == []


def test_convert_help_names_the_stage_kinds_and_gamma_is_a_float():
    for command in ("convert", "analyze"):
        help_text = " ".join(cli(command, "--help").output.split())
        for kind in KINDS:
            assert f"{kind} ({DESCRIPTIONS[kind]})" in help_text, (command, kind)
        assert "--gamma FLOAT" in help_text
