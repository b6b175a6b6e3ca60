"""The layer every command stands on (cspify.cli.options, cspify.cli.run): one set of option
declarations, one load-convert-measure step, one all-or-nothing writer for every command's files."""

from __future__ import annotations

import json
import os

import torch

from cspify.cli import main
from cspify.cli.run import Progress, load_convert_measure
from test_cli import TINY_RES, check_error, cli, listing, models, work  # noqa: F401

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
                   fusion="last", hidden="keep", stages=(), allow_costlier=False, kinds=None, round_to="1")
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
    def broken(result, f):
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


def test_sweep_refuses_an_existing_output_before_converting(work, models):
    (work / "s.json").write_text("{}")
    before = listing(work)
    result = cli("sweep", models("tiny.py", TINY_RES), "--gammas", "0.5", "--json", "s.json")
    check_error(result, 6, before, work, "s.json", "--force", quiet=False)
    assert "loading" not in result.stderr and os.path.getsize(work / "s.json") == 2
