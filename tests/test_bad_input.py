"""Bad input, tried on purpose: each kind gives one `error:` sentence and a `hint:` line,
the documented exit code (see cspify/cli/__init__.py), no traceback, no file left behind and the
user's model untouched. Extends the error cases of tests/test_cli.py, which it reuses."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.errors import ConfigError, NoStageError
from cspify.record import conversion_of
from tiny_models import TinyResNet, cbr, seeded
from test_cli import PLAIN, RESNET, SMALL, TINY_RES, check_error, cli, listing, models, run_error, work  # noqa: F401

HEADER = "import torch\nimport torch.nn as nn\n"


def bad_file(models, name, body):
    path = models(name, body)
    return path, path.read_bytes()


# ---------------------------------------------------------------- the model file


@pytest.mark.parametrize("body, words", [
    (HEADER + "import not_a_module_xyz\n", ["fails to import", "not_a_module_xyz"]),
    (HEADER + "raise RuntimeError('boom at import')\n", ["RuntimeError", "boom at import"]),
    (HEADER + "import sys\nsys.exit(3)\n", ["sys.exit(3)"]),
    (TINY_RES + "\nclass Wide(TinyRes):\n    def __init__(self, width):\n        super().__init__()\n", ["Wide", "arguments"]),
], ids=["import-error", "raises-at-import", "sys-exit", "constructor-needs-arguments"])
def test_model_file_that_cannot_be_run(work, models, body, words):
    path, content = bad_file(models, "m.py", body)
    spec = f"{path}:Wide" if "Wide" in words else path
    result, before = run_error(work, "convert", spec)
    check_error(result, 3, before, work, *words)
    assert path.read_bytes() == content


def test_constructor_that_raises(work, models):
    path, _ = bad_file(models, "m.py", HEADER + "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        raise ValueError('no weights')\n")
    result, before = run_error(work, "convert", f"{path}:Net")
    check_error(result, 3, before, work, "building", "no weights")


@pytest.mark.parametrize("name, words", [("WIDTH", ["int", "not a model"]), ("make", ["Tensor", "not a torch.nn.Module"])])
def test_name_that_is_not_a_model(work, models, name, words):
    path, _ = bad_file(models, "m.py", HEADER + "WIDTH = 8\n\ndef make():\n    return torch.zeros(1)\n")
    result, before = run_error(work, "convert", f"{path}:{name}")
    check_error(result, 3, before, work, *words)


def test_not_a_python_file(work, models):
    path, _ = bad_file(models, "model.txt", "not python at all\n")
    result, before = run_error(work, "convert", path)
    check_error(result, 3, before, work, "not a Python file")


def test_a_folder_as_model(work, tmp_path):
    result, before = run_error(work, "convert", tmp_path)
    check_error(result, 3, before, work, "is a folder")


def test_example_inputs_that_raise(work, models):
    path, _ = bad_file(models, "m.py", TINY_RES + "\ndef example_inputs():\n    raise ValueError('no data')\n")
    result, before = run_error(work, "convert", path)
    check_error(result, 3, before, work, "example_inputs()", "no data", "--input-shape")


def test_unknown_timm_model(work):
    result, before = run_error(work, "convert", "timm:no_such_net_xyz")
    check_error(result, 3, before, work, "no_such_net_xyz")


# ---------------------------------------------------------------- inputs


def test_wrong_input_rank(work, models):
    result, before = run_error(work, "convert", models("tiny.py", TINY_RES), "--input-shape", "1,3,16")
    check_error(result, 4, before, work, "1x3x16", "--input-shape")


EMBEDDING = HEADER + """
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c), nn.ReLU(), nn.Conv1d(c, c, 3, padding=1))

    def forward(self, x):
        return torch.relu(x + self.f(x))


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(Block(16), Block(16), Block(16))
        self.head = nn.Conv1d(16, 5, 1)

    def forward(self, tokens):
        return self.head(self.body(self.embed(tokens).transpose(1, 2)))


def example_inputs():
    return torch.randint(0, 50, (2, 12))
"""


def test_integer_inputs_convert(work, models):
    """An embedding model's integer example inputs go through as they are."""
    result = cli("convert", models("tagger.py", EMBEDDING), "-o", "m.pt", "-q")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "body" in result.stdout and listing(work) == ["m.pt"]


def test_float_inputs_for_an_embedding_model(work, models):
    result, before = run_error(work, "convert", models("tagger.py", EMBEDDING), "--input-shape", "2,12")
    check_error(result, 4, before, work, "2x12", "Long")


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("gamma", ["inf", "0.0", "0x1", "1,5"])
def test_more_bad_gammas(work, gamma):
    result, before = run_error(work, "convert", RESNET, *SMALL, f"--gamma={gamma}")
    check_error(result, 2, before, work, "gamma")


@pytest.mark.parametrize("gamma, part", [("0.001", "bypass"), ("0.999", "through"), ("1e-300", "bypass")])
def test_gamma_that_empties_a_part(work, gamma, part):
    result, before = run_error(work, "convert", RESNET, *SMALL, "--gamma", gamma)
    check_error(result, 5, before, work, f"{part} part", "empty")


def test_scope_naming_a_missing_submodule(work):
    result, before = run_error(work, "convert", RESNET, *SMALL, "--scope", "backbone.body")
    check_error(result, 2, before, work, "backbone.body", "stages")


def test_leaf_naming_a_missing_submodule(work):
    result, before = run_error(work, "convert", RESNET, *SMALL, "--leaf", "stages.9")
    check_error(result, 2, before, work, "stages.9", "leaf")


@pytest.mark.parametrize("args", [["--seed", "abc"], ["-o", "."], ["--export-dir", "f.txt"], ["--onnx", "."]],
                         ids=["seed-not-a-number", "output-is-a-folder", "export-dir-is-a-file", "onnx-is-a-folder"])
def test_usage_errors(work, args):
    """click checks these before cspify runs: its own "Error:" line, exit code 2."""
    (work / "f.txt").write_text("mine")
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, *args, "--force", "-q")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error: Invalid value" in result.stderr
    assert listing(work) == before and (work / "f.txt").read_text() == "mine"


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("flag, target", [("--export-dir", "csp"), ("--onnx", "m.onnx")])
def test_existing_export_target_without_force(work, flag, target):
    (work / target).mkdir() if flag == "--export-dir" else (work / target).write_text("old")
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, "-o", "m.pt", flag, target, "-q")
    check_error(result, 6, before, work, target, "--force")


def test_output_inside_a_file(work):
    (work / "afile").write_text("data")
    before = listing(work)
    result = cli("convert", RESNET, *SMALL, "-o", "afile/out.pt", "-q")
    check_error(result, 6, before, work, "afile is a file")


CUSTOM_LEAF = TINY_RES.replace("class TinyRes(nn.Module):", """class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class TinyRes(nn.Module):""").replace("self.head = nn.Sequential(", "self.scale = Scale()\n        self.head = nn.Sequential(").replace(
    "return self.head(self.layer(self.stem(x)))", "return self.head(self.scale(self.layer(self.stem(x))))")


def test_export_dir_of_a_custom_layer_writes_nothing(work, models):
    result, before = run_error(work, "convert", models("tiny.py", CUSTOM_LEAF), "--leaf", "scale", "--export-dir", "csp")
    check_error(result, 6, before, work, "scale", "cannot be written as source", "-o")


# ---------------------------------------------------------------- the API


def unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


X = torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(stages=["layer9"]), ConfigError, ["layer9", "layer1", "layer2"]),
    (dict(gamma=-1), ConfigError, ["gamma"]),
    (dict(gamma="half"), ConfigError, ["gamma", "half"]),
    (dict(gamma=0.01), NoStageError, ["bypass part", "empty"]),
    (dict(fusion="middle"), ConfigError, ["fusion"]),
    (dict(hidden="double"), ConfigError, ["hidden"]),
    (dict(scope="nowhere"), ConfigError, ["nowhere"]),
    (dict(leaf_modules=["layer1.7"]), ConfigError, ["layer1.7"]),
], ids=["stage", "gamma-negative", "gamma-text", "gamma-empties", "fusion", "hidden", "scope", "leaf"])
def test_api_errors_leave_the_model_untouched(kwargs, error, words):
    model = seeded(TinyResNet)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error) as info:
        cspify.convert(model, X, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert info.value.hint and str(info.value).count(".") >= 1
    assert unchanged(model, before) and not model.training


def test_api_no_residual_or_dense_stage():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    with pytest.raises(NoStageError, match="no residual, dense, aggregation or plain stage") as info:
        cspify.convert(model, X)
    assert "analyze" in info.value.hint


class SharedTower(nn.Module):
    """One conv chain called at two levels, as a detector head's tower is."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(*[cbr(16, 16, 3) for _ in range(3)])

    def forward(self, a, b):
        return self.tower(a), self.tower(b)


def test_stages_refused_for_one_reason_are_named_together():
    with pytest.raises(NoStageError) as info:
        cspify.convert(seeded(SharedTower), (torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)))
    assert info.value.message.startswith("none of the 2 stages found in SharedTower can be converted (stage1, stage2: "
                                         "'tower.0.0' is used 2 times")
    assert info.value.message.count("is used 2 times") == 1


def test_converting_a_converted_model_again_works():
    """The through part's blocks are a stage again: a second conversion narrows it further."""
    model = seeded(TinyResNet)
    once = cspify.convert(model, X)
    before = copy.deepcopy(once.state_dict())
    twice = cspify.convert(once, X)
    assert unchanged(once, before)
    with torch.no_grad():
        assert twice(X).shape == once(X).shape == model(X).shape
    report = cspify.compare(once, twice, X)
    assert report.to_dict()["converted"]["flops"] < report.to_dict()["original"]["flops"]


class Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.net = kind, seeded(TinyResNet)

    def forward(self, x):
        y = self.net(x)
        return {"none": None, "empty": (), "dict": {"logits": y, "n": 3}, "text": "label"}[self.kind]


@pytest.mark.parametrize("kind", ["none", "empty", "dict", "text"])
def test_empty_or_non_tensor_outputs_convert(kind):
    """Outputs that are not one tensor pass through unchanged; the stages inside still convert."""
    model = Wrapped(kind).eval()
    csp = cspify.convert(model, X)
    with torch.no_grad():
        got, want = csp(X), model(X)
    if kind == "dict":
        assert got["n"] == 3 and got["logits"].shape == want["logits"].shape
    else:
        assert got == want
    assert conversion_of(csp).converted


# ---------------------------------------------------------------- safety


def test_loading_a_model_file_runs_its_code_as_help_and_readme_say(work, models, tmp_path):
    marker = tmp_path / "ran.txt"
    path = models("tiny.py", TINY_RES + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    result = cli("analyze", path, "-q")
    assert result.exit_code == 0 and marker.read_text() == "ran"
    assert "executed" in " ".join(cli("convert", "--help").output.split())
    from test_cli import ROOT
    assert "Loading a model file runs its Python code" in (ROOT / "README.md").read_text()


# ---------------------------------------------------- nothing to convert: analyze reports, convert refuses briefly

CSP_ALREADY = HEADER + """

def cbr(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = cbr(c, c, 3), cbr(c, c, 3)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class Split(nn.Module):
    \"\"\"Cross stage partial already: half the channels bypass the blocks.\"\"\"

    def __init__(self, cin, c):
        super().__init__()
        self.cv1, self.cv2 = cbr(cin, c, 1), cbr(c, c, 1)
        self.m = nn.Sequential(Bottleneck(c // 2), Bottleneck(c // 2))

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, self.m(b)], 1))


class CSPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.block1, self.block2 = Split(16, 32), Split(32, 64)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


def example_inputs():
    return torch.randn(1, 3, 16, 16)
"""
FX_NAME = re.compile(r"'[a-z][a-z0-9]*(?:_[a-z0-9]+)+'")  # a torch.fx node name: 'block1_cv1_2', 'getitem_1'


def test_analyze_shows_each_stage_left_and_why_where_nothing_converts(work, models):
    path, content = bad_file(models, "csp.py", CSP_ALREADY)
    result = cli("analyze", path, "--json", "r.json", "--markdown", "r.md", "-q")
    assert result.exit_code == 0, result.output
    out = result.stdout
    left = out.split("not converted:\n")[1]
    for stage, channels in (("block1.m", 16), ("block2.m", 32)):
        assert re.search(rf"^  {re.escape(stage)}\s+residual\s+{channels}\s+it is already the through part of a cross "
                         "stage partial block; name it$", left, re.M), out
    assert "none of the 2 stages found can be converted" in out
    assert out.rstrip().endswith("saved the report as JSON to r.json\nsaved the report as Markdown to r.md")
    reasons = [row["reason"] for row in json.loads((work / "r.json").read_text())["stages"]]
    assert "split from 'block1.cv1.2'" in reasons[0] and "'cat' in 'block1'" in reasons[0]
    assert not FX_NAME.search(" ".join(reasons) + out + (work / "r.md").read_text())
    assert path.read_bytes() == content


def test_convert_refuses_where_nothing_converts_in_one_short_sentence(work, models):
    path, _ = bad_file(models, "csp.py", CSP_ALREADY)
    result, before = run_error(work, "convert", path)
    check_error(result, 5, before, work, "none of the 2 stages found in CSPNet can be converted (block1.m, block2.m: "
                "it is already the through part of a cross stage partial block", "--stage", "cspify analyze")
    error = result.stderr.splitlines()[0]
    assert len(error) < 250 and error.count("already the through part") == 1 and not FX_NAME.search(error)


def test_yolov8n_is_analyzed_and_its_refusal_names_modules(work, monkeypatch):
    pytest.importorskip("ultralytics")
    for key, value in (("YOLO_OFFLINE", "1"), ("YOLO_AUTOINSTALL", "0"), ("YOLO_VERBOSE", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(work.parent / "yolo"))
    args = ("ultralytics:yolov8n.yaml", "--input-shape", "1,3,64,64", "-q")
    result = cli("analyze", *args)
    assert result.exit_code == 0, result.output
    left = result.stdout.split("not converted:\n")[1]
    assert len(re.findall(r"^  model\.\d+\.m\.0\s", left, re.M)) == 8 and "model.4.m.1" in left
    assert not FX_NAME.search(result.stdout) and "model_0_act" not in result.stdout
    refused = cli("convert", *args)
    assert refused.exit_code == 5 and refused.stderr.startswith("error: none of the 10 stages found in DetectionModel")
    error = refused.stderr.splitlines()[0]
    assert len(error) < 300 and "model.2.m.0, model.4.m.0, model.4.m.1, model.6.m.0 and 6 more: it is already" in error
    assert not FX_NAME.search(refused.stderr) and listing(work) == []


# ---------------------------------------------------------------- outputs refused before any work


@pytest.mark.parametrize("args, words", [
    (["-o", "m.pt", "--json", "m.pt"], ["-o and --json both write m.pt"]),
    (["--json", "r.json", "--markdown", "./r.json"], ["--json and --markdown both write ./r.json"]),
    (["--markdown", "r.md", "--plot", "r.md"], ["--markdown and --plot both write r.md"]),
    (["--export-dir", "out", "--onnx", "out"], ["--export-dir and --onnx both write out"]),
    (["--plot", "p.bmp"], ["cannot be written as .bmp", ".jpg", ".png"]),
    (["--plot", "p.png", "--force", "--json", "p.png"], ["both write p.png"]),
], ids=["model-and-json", "json-and-markdown", "markdown-and-plot", "dir-and-onnx", "bmp", "with-force"])
def test_outputs_that_cannot_be_written_are_refused_before_loading(work, args, words):
    result = cli("convert", RESNET, *SMALL, *args)
    check_error(result, 6, [], work, *words, "hint: ", quiet=False)
    assert "loading" not in result.stderr


def test_calibration_data_that_does_not_exist_is_refused_before_converting(work):
    result = cli("convert", RESNET, *SMALL, "--calibrate", work / "nowhere", "-o", "m.pt")
    check_error(result, 7, [], work, "nowhere", "does not exist", quiet=False)
    assert "loading" not in result.stderr and "converting" not in result.stderr
