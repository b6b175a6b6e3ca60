"""The ``cspify`` command line: convert / analyze, its files, its exit codes and its error lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cspify.cli import main
from cspify.load import load_model

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "resnet_like.py"
DENSENET = ROOT / "examples" / "densenet_like.py"
SMALL = ["--input-shape", "1,3,32,32"]  # keeps each conversion of the examples well under a second
RESNET_STAGES = ["stages.0", "stages.1", "stages.2"]  # its residual stages
RESNET_FOUND = RESNET_STAGES  # its first block's branch (32 -> 16 -> 16) is no plain stage: one conv after the first


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart by itself


def cli(*args):
    return _runner().invoke(main, [str(a) for a in args])


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def console_script() -> str:
    beside = Path(sys.executable).parent / "cspify"
    found = str(beside) if beside.exists() else shutil.which("cspify")
    assert found, "the cspify console script is not installed"
    return found


def listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, hidden ones included."""
    found = []
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(top, name), folder))
    return sorted(found)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder as the current directory; model files go to a folder beside it."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()

    def write(name: str, source: str) -> Path:
        path = folder / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


TINY_RES = """\
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return torch.relu(x + self.f(x))


class TinyRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer = nn.Sequential(Block(16), Block(16), Block(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.layer(self.stem(x)))


def example_inputs():
    return torch.randn(1, 3, 16, 16)
"""

PLAIN = """\
import torch
import torch.nn as nn


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )

    def forward(self, x):
        return self.body(x)


def example_inputs():
    return torch.randn(1, 3, 16, 16)
"""

UNTRACEABLE = """\
import torch
import torch.nn as nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = x + self.b(x)
        return x


def example_inputs():
    return torch.randn(1, 3, 16, 16)
"""

NO_MODEL = """\
import torch.nn as nn

WIDTH = 8


def helper(x):
    return x + 1
"""

SEVERAL = """\
import torch.nn as nn


class First(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class Second(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.conv(x)
"""


# ---------------------------------------------------------------- successful runs


@pytest.mark.parametrize(
    "example, stages",
    [(RESNET, RESNET_STAGES), (DENSENET, ["features.1-4", "features.6-9"])],
    ids=["resnet_like", "densenet_like"],
)
def test_the_examples_convert_and_print_the_table(work, example, stages):
    result = cli("convert", example, *SMALL)
    assert result.exit_code == 0, result.stderr + result.stdout
    out = result.stdout
    assert "flops" in out and "saved" in out
    for name in stages:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), f"no row for {name} in\n{out}"
    assert listing(work) == [], "convert without -o/--json/--markdown must write nothing"


def test_convert_uses_example_inputs_of_the_file(work, models):
    path = models("tiny.py", TINY_RES)
    result = cli("convert", path, "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert re.search(r"^layer\s", result.stdout, re.M)
    assert result.stderr == "", "-q must silence the progress lines"


def test_progress_lines_go_to_stderr(work):
    result = cli("convert", DENSENET, *SMALL)
    assert result.exit_code == 0
    assert "loading" in result.stderr and "measuring" in result.stderr
    assert "cspify:" not in result.stdout


def test_output_model_loads_back_with_the_same_output_shape(work):
    result = cli("convert", RESNET, *SMALL, "-o", "out.pt", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert listing(work) == ["out.pt"], "no temporary file may be left beside the output"
    converted = torch.load(work / "out.pt", weights_only=False)
    assert isinstance(converted, torch.nn.Module)
    original = load_model(str(RESNET), (1, 3, 32, 32)).model
    x = torch.randn(1, 3, 32, 32)
    converted.eval()
    with torch.no_grad():
        assert converted(x).shape == original(x).shape == (1, 10)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(converted) < n_params(original)


def test_json_report(work):
    result = cli("convert", DENSENET, *SMALL, "--json", "report.json", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert listing(work) == ["report.json"]
    data = json.loads((work / "report.json").read_text())
    for side in ("original", "converted"):
        for key in ("flops", "params", "activations", "memory_bytes"):
            value = data[side][key]
            assert type(value) is int and value > 0, f"{side}.{key} = {value!r}"
    assert data["converted"]["flops"] < data["original"]["flops"]
    rows = data["stages"]
    assert [r["name"] for r in rows][:2] == ["features.1-4", "features.6-9"]
    for row in rows:
        for key in ("name", "kind", "channels", "bypass_channels", "converted", "reason", "flops_before", "flops_after"):
            assert key in row, f"stage row without {key}: {row}"
        assert row["kind"] == "dense"
        assert type(row["converted"]) is bool
        assert isinstance(row["reason"], str)
        for key in ("channels", "bypass_channels", "flops_before", "flops_after"):
            assert type(row[key]) is int, f"{key} = {row[key]!r}"
        if row["converted"]:
            assert 0 < row["bypass_channels"] < row["channels"]
            assert row["flops_after"] < row["flops_before"]
    assert any(r["converted"] for r in rows)


def test_markdown_report(work):
    result = cli("convert", RESNET, *SMALL, "--markdown", "report.md", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert listing(work) == ["report.md"]
    text = (work / "report.md").read_text()
    lines = text.splitlines()
    assert any(line.startswith("#") for line in lines)
    table = [line for line in lines if line.startswith("|")]
    assert any(re.fullmatch(r"\|[-:| ]+\|", line) for line in table), "no Markdown header separator"
    assert any("flops" in line for line in table)
    for name in RESNET_STAGES:
        assert any(line.startswith(f"| {name} ") for line in table), f"no row for {name}"


def test_all_three_outputs_at_once(work):
    result = cli("convert", DENSENET, *SMALL, "-o", "m.pt", "--json", "r.json", "--markdown", "r.md", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert listing(work) == ["m.pt", "r.json", "r.md"]


def test_analyze_prints_the_stages_and_writes_nothing(work):
    result = cli("analyze", RESNET, *SMALL)
    assert result.exit_code == 0, result.stderr + result.stdout
    for name in RESNET_STAGES:
        assert name in result.stdout
    assert "flops" in result.stdout
    assert "saved the converted model" not in result.stdout
    assert listing(work) == []


def test_analyze_has_no_output_option(work):
    result = cli("analyze", RESNET, *SMALL, "-o", "out.pt")
    assert result.exit_code == 2
    assert listing(work) == []


@pytest.mark.parametrize("chosen", [["stages.1"], ["stages.0", "stages.2"]], ids=["one", "two"])
def test_stage_option_converts_only_the_named_stages(work, chosen):
    args = [a for name in chosen for a in ("--stage", name)]
    result = cli("convert", RESNET, *SMALL, *args, "--json", "r.json", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {r["name"]: r for r in json.loads((work / "r.json").read_text())["stages"]}
    assert sorted(rows) == RESNET_FOUND
    for name, row in rows.items():
        assert row["converted"] is (name in chosen), row
        if name in chosen:
            assert row["flops_after"] < row["flops_before"]
        else:
            assert row["flops_after"] == row["flops_before"]
            assert row["reason"]
    table_rows = [line.split()[0] for line in result.stdout.splitlines() if re.match(r"stages\.\d\s", line)]
    assert table_rows == chosen


def test_gamma_and_options_reach_the_report(work):
    result = cli("convert", RESNET, *SMALL, "--gamma", "0.25", "--hidden", "scale", "--json", "r.json", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    data = json.loads((work / "r.json").read_text())
    assert [r["bypass_channels"] for r in data["stages"] if r["kind"] == "residual"] == [16, 32, 64]
    assert "gamma=0.25" in result.stdout and "hidden=scale" in result.stdout


def test_round_to_reaches_the_plan_and_the_report(work):
    """gamma 0.375 of 64 channels asks for a through part of 40: 32 as a multiple of 16."""
    result = cli("convert", RESNET, *SMALL, "--gamma", "0.375", "--hidden", "scale", "--round-to", "16", "--json", "r.json",
                 "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    data = json.loads((work / "r.json").read_text())
    assert [r["bypass_channels"] for r in data["stages"] if r["kind"] == "residual"] == [32, 48, 96]
    assert "round_to=16" in result.stdout and "rounded from 40 to 32 channels (multiple of 16)" in result.stdout
    bad = cli("analyze", RESNET, *SMALL, "--round-to", "0")
    assert bad.exit_code == 2 and "round_to must be a positive whole number" in bad.stderr and "hint:" in bad.stderr


def test_force_overwrites_an_existing_output(work):
    (work / "out.pt").write_bytes(b"old content")
    result = cli("convert", RESNET, *SMALL, "-o", "out.pt", "--force", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert (work / "out.pt").read_bytes() != b"old content"
    assert isinstance(torch.load(work / "out.pt", weights_only=False), torch.nn.Module)
    assert listing(work) == ["out.pt"]


def _trained_tiny_res(models) -> tuple[Path, dict]:
    """TinyRes with non-default weights, saved as a DDP checkpoint would be."""
    path = models("tiny.py", TINY_RES)
    torch.manual_seed(3)
    model = load_model(str(path)).model
    for p in model.parameters():
        p.data.normal_()
    state = model.state_dict()
    return path, state


def test_weights_are_loaded_before_conversion(work, models):
    path, state = _trained_tiny_res(models)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 9}, work.parent / "w.pt")
    result = cli("convert", path, "--weights", work.parent / "w.pt", "-o", "m.pt")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "with weights" in result.stderr
    converted = torch.load(work / "m.pt", weights_only=False)
    assert torch.equal(converted.stem.weight, state["stem.weight"])  # the stem is not narrowed: the trained one
    assert torch.equal(converted.state_dict()["head.2.weight"], state["head.2.weight"])


def test_error_weights_that_do_not_fit(work, models):
    path, state = _trained_tiny_res(models)
    state["head.2.weight"] = torch.zeros(10, 16)
    torch.save(state, work.parent / "w.pt")
    result, before = run_error(work, "convert", path, "--weights", work.parent / "w.pt")
    check_error(result, 3, before, work, "head.2.weight", "10x16", "4x16")
    result, before = run_error(work, "convert", path, "--weights", work.parent / "none.pt")
    check_error(result, 3, before, work, "none.pt", "does not exist")
    assert "loading" not in result.stderr


# ---------------------------------------------------------------- errors


def check_error(result, code: int, before: list[str], folder: Path, *words: str, quiet: bool = True) -> None:
    """Exit code, one `error:` line and a `hint:` line on stderr, no traceback, no file left behind."""
    assert result.exit_code == code, (
        f"exit {result.exit_code}, want {code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    if quiet:
        assert err.startswith("error: "), err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) > len("error: "), err
    hints = [line for line in lines if line.startswith("hint: ")]
    assert len(hints) == 1 and len(hints[0]) > len("hint: "), err
    assert lines.index(hints[0]) > lines.index(errors[0])
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert "CSP conversion" not in result.stdout, "no report on an error"
    assert listing(folder) == before, "an error left a file behind"


OUTPUTS = ["-o", "out.pt", "--json", "r.json", "--markdown", "r.md", "-q"]


def run_error(folder: Path, *args):
    before = listing(folder)
    return cli(*args, *OUTPUTS), before


def test_error_missing_file(work):
    result, before = run_error(work, "convert", work / "nothere.py")
    check_error(result, 3, before, work, "nothere.py")


def test_error_missing_file_with_a_name(work):
    result, before = run_error(work, "convert", f"{work / 'nothere.py'}:Net")
    check_error(result, 3, before, work, "nothere.py")


def test_error_no_model_in_the_file(work, models):
    result, before = run_error(work, "convert", models("empty.py", NO_MODEL))
    check_error(result, 3, before, work)


def test_error_several_candidates_lists_them(work, models):
    result, before = run_error(work, "convert", models("two.py", SEVERAL))
    check_error(result, 3, before, work, "First", "Second")


def test_several_candidates_then_name_one(work, models):
    path = models("two.py", SEVERAL)
    result = cli("convert", f"{path}:Second", "--input-shape", "1,3,8,8", "-q")
    assert result.exit_code == 5  # found, built and traced: a bare conv has no stage
    assert "Second" in result.stderr


def test_error_syntax_error_in_the_file(work, models):
    result, before = run_error(work, "convert", models("broken.py", "import torch\ndef f(:\n    pass\n"))
    check_error(result, 3, before, work, "line 2")


def test_error_unknown_name_in_file(work, models):
    result, before = run_error(work, "convert", f"{models('tiny.py', TINY_RES)}:Nope")
    check_error(result, 3, before, work, "Nope", "TinyRes")


def test_error_unknown_torchvision_model(work):
    result, before = run_error(work, "convert", "torchvision:no_such_net_xyz")
    check_error(result, 3, before, work, "no_such_net_xyz")


def test_error_untraceable_model(work, models):
    result, before = run_error(work, "convert", models("branchy.py", UNTRACEABLE))
    check_error(result, 4, before, work)


def test_error_input_shape_the_model_rejects(work, models):
    result, before = run_error(work, "convert", models("tiny.py", TINY_RES), "--input-shape", "1,1,8,8")
    check_error(result, 4, before, work, "1x1x8x8", "--input-shape")


@pytest.mark.parametrize("gamma", ["0", "1", "-0.5", "abc", "1.5", "nan"])
def test_error_bad_gamma(work, gamma):
    result, before = run_error(work, "convert", RESNET, *SMALL, f"--gamma={gamma}")
    check_error(result, 2, before, work, "gamma")


def test_error_negative_gamma_as_separate_argument(work):
    result, before = run_error(work, "convert", RESNET, *SMALL, "--gamma", "-0.5")
    check_error(result, 2, before, work, "gamma")


@pytest.mark.parametrize("shape", ["abc", "1,3,-2,2", "", "1,3,0,8", "1,3,,8"])
def test_error_bad_input_shape_text(work, models, shape):
    result, before = run_error(work, "convert", models("tiny.py", TINY_RES), f"--input-shape={shape}")
    check_error(result, 2, before, work, "input shape")


def test_error_unknown_stage_name_lists_the_real_ones(work):
    result, before = run_error(work, "convert", RESNET, *SMALL, "--stage", "layer9")
    check_error(result, 2, before, work, "layer9", *RESNET_STAGES)


def test_error_plain_cnn_has_no_stage(work, models):
    result, before = run_error(work, "convert", models("plain.py", PLAIN))
    check_error(result, 5, before, work)


def test_analyze_plain_cnn_reports_that_it_has_no_stage(work, models):
    result = cli("analyze", models("plain.py", PLAIN), "-q")
    assert result.exit_code == 0, result.output
    assert "CSP conversion" in result.stdout and "0.0%" in result.stdout and result.stderr == ""
    assert "notes:\n  Plain has no residual, dense, aggregation or plain stage; cspify converts" in result.stdout
    assert listing(work) == []


def test_kind_filter_keeps_to_the_kinds_asked_for(work, models):
    result = cli("analyze", RESNET, *SMALL, "--kind", "dense", "-q")
    assert result.exit_code == 0 and "no dense stage" in result.stdout, result.output
    assert "without --kind it looks for every kind" in result.stdout
    result = cli("convert", RESNET, *SMALL, "--kind", "dense", "-q")
    assert result.exit_code == 5 and "no dense stage" in result.stderr, result.output
    result = cli("analyze", RESNET, *SMALL, "--kind", "residual,plain", "-q")
    assert result.exit_code == 0 and "residual" in result.output, result.output
    before = listing(work)
    result = cli("analyze", RESNET, *SMALL, "--kind", "chain", "-q")
    check_error(result, 2, before, work, "'chain' is not a kind", "residual,dense")


def test_error_existing_output_without_force(work):
    (work / "out.pt").write_bytes(b"old content")
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, "-o", "out.pt", "-q")
    check_error(result, 6, before, work, "out.pt", "--force")
    assert (work / "out.pt").read_bytes() == b"old content"


def test_error_existing_json_without_force_writes_no_model_either(work):
    (work / "r.json").write_text("{}")
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, "-o", "out.pt", "--json", "r.json", "-q")
    check_error(result, 6, before, work, "r.json")
    assert (work / "r.json").read_text() == "{}"


def test_error_output_folder_does_not_exist(work):
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, "-o", work / "nowhere" / "out.pt", "-q")
    check_error(result, 6, before, work, "nowhere")


def test_error_report_folder_missing_writes_no_model(work):
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, "-o", "out.pt", "--markdown", "nowhere/r.md", "-q")
    check_error(result, 6, before, work, "nowhere")


def test_error_lines_follow_the_progress_lines_without_quiet(work, models):
    before = listing(work)
    result = cli("convert", models("branchy.py", UNTRACEABLE), "-o", "out.pt")
    check_error(result, 4, before, work, quiet=False)
    assert "failed" in result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-2].startswith("error: ")


def test_bad_fusion_is_a_usage_error(work):
    result = cli("convert", RESNET, *SMALL, "--fusion", "middle", "-o", "out.pt")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert listing(work) == []


# ---------------------------------------------------------------- as installed, in a process of its own


def test_console_script_end_to_end(tmp_path):
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [console_script(), "convert", str(RESNET), *SMALL, "-o", str(out), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "flops" in proc.stdout and "stages.0" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "r.json"]
    # loaded in this process, which never ran the example file
    converted = torch.load(out, weights_only=False).eval()
    with torch.no_grad():
        assert converted(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert json.loads((tmp_path / "r.json").read_text())["original"]["flops"] > 0


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [console_script(), "convert", str(tmp_path / "nothere.py"), "--debug"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=240,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "LoadError" in proc.stderr


def test_python_dash_m_cspify_cli_runs_the_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cspify.cli", "analyze", str(tmp_path / "nothere.py"), "-q"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=240,
    )
    assert proc.returncode == 3, f"rc {proc.returncode}, stderr {proc.stderr!r}"
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
