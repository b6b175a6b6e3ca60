"""Writing the converted model out: readable source that loads without cspify, ONNX, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner

import cspify
from cspify.cli import main
from cspify.errors import OutputError
from cspify.export import ExportError, save_model, source_of, write_onnx, write_source
from cspify.files import Outputs
from tiny_models import TinyDenseNet, TinyResNet, randomize_norms, seeded
from test_cli import TINY_RES, cli, models  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "resnet_like.py"
SMALL = ["--input-shape", "2,3,32,32"]
SITE_PACKAGES = os.path.dirname(os.path.dirname(torch.__file__))

# Run with -I -S: no PYTHONPATH, no current folder, no site-packages processing (so no
# editable-install hook for cspify); torch's own folder is added by hand, .pth files unread.
LOAD_WITHOUT_CSPIFY = textwrap.dedent(f"""
    import importlib.util, sys
    sys.path.append({SITE_PACKAGES!r})
    try:
        import cspify
    except ImportError:
        pass
    else:
        raise SystemExit("cspify is importable in the clean process")
    import torch
    torch.set_num_threads(1)
    for i, folder in enumerate(sys.argv[1:]):
        spec = importlib.util.spec_from_file_location(f"exported_{{i}}", folder + "/model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.load()
        x = torch.load(folder + "/x.pt", weights_only=True)
        with torch.no_grad():
            torch.save(model(x), folder + "/y.pt")
    bad = [m for m in sys.modules if m.startswith("cspify")]
    assert not bad, bad
    print("loaded", len(sys.argv) - 1)
""")


def run_without_cspify(script: str, *folders: Path) -> list:
    """Run ``script`` on ``folders`` in a fresh isolated interpreter; what each folder's y.pt holds."""
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, *map(str, folders)],
        capture_output=True, text=True, env=env, cwd=folders[0].parent, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"loaded {len(folders)}" in proc.stdout
    return [torch.load(folder / "y.pt", weights_only=True) for folder in folders]


def load_in_clean_process(*folders: Path) -> list[torch.Tensor]:
    return run_without_cspify(LOAD_WITHOUT_CSPIFY, *folders)


# The same clean process for -o files: each folder's m.pt through torch.load, with cspify
# blocked outright as well (None in sys.modules: any import of it fails).
LOAD_PICKLE_WITHOUT_CSPIFY = textwrap.dedent(f"""
    import sys
    sys.path.append({SITE_PACKAGES!r})
    sys.modules["cspify"] = None
    import torch
    torch.set_num_threads(1)
    for folder in sys.argv[1:]:
        model = torch.load(folder + "/m.pt", weights_only=False).eval()
        x = torch.load(folder + "/x.pt", weights_only=True)
        with torch.no_grad():
            y = model(x)
        meta = getattr(model, "meta", {{}})
        torch.save({{"y": y, "type": vars(model).get("type"), "names": getattr(model, "names", None),
                    "record": type(meta.get("cspify")).__name__, "stages": len(meta.get("cspify", {{}}).get("stages", ()))}},
                   folder + "/y.pt")
    bad = [m for m in sys.modules if m.startswith("cspify") and sys.modules[m] is not None]
    assert not bad, bad
    print("loaded", len(sys.argv) - 1)
""")


def load_pickles_in_clean_process(*folders: Path) -> list[dict]:
    return run_without_cspify(LOAD_PICKLE_WITHOUT_CSPIFY, *folders)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_cspify_is_not_importable_in_the_clean_process(tmp_path):
    env = {"PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.append({SITE_PACKAGES!r}); import cspify"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode != 0 and "No module named 'cspify'" in proc.stderr


def test_source_export_loads_without_cspify_and_matches(tmp_path):
    """Three families through write_source; one clean process loads all three."""
    cases = {
        "residual": (randomize_norms(seeded(TinyResNet)), torch.randn(2, 3, 16, 16)),
        "dense": (randomize_norms(seeded(TinyDenseNet)), torch.randn(2, 3, 16, 16)),
        "resnet18": (seeded(torchvision.models.resnet18), torch.randn(1, 3, 64, 64)),
    }
    expected, folders = {}, []
    for name, (model, x) in cases.items():
        gm = cspify.convert(model, x).eval()
        folder = tmp_path / name
        folder.mkdir()
        write_source(gm, str(folder))
        torch.save(x, folder / "x.pt")
        with torch.no_grad():
            expected[name] = gm(x)
        folders.append(folder)
        text = (folder / "model.py").read_text()
        assert "cspify_user_model" not in text and "import cspify" not in text
        assert "torch.load(path, map_location=map_location, weights_only=True)" in text
        compile(text, "model.py", "exec")
    for folder, got in zip(folders, load_in_clean_process(*folders)):
        assert torch.equal(got, expected[folder.name]), f"{folder.name}: {(got - expected[folder.name]).abs().max()}"


def test_cli_export_dir_and_model_file_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("convert", RESNET, *SMALL, "-o", "m.pt", "--export-dir", "csp", "--seed", "3", "-q")
    assert result.exit_code == 0, result.output
    assert "saved its source and weights to csp" in result.output
    assert listing(tmp_path) == ["csp", "csp/__init__.py", "csp/model.py", "csp/weights.pt", "m.pt"]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "csp" / "x.pt")
    (got,) = load_in_clean_process(tmp_path / "csp")
    with torch.no_grad():
        want = torch.load(tmp_path / "m.pt", weights_only=False).eval()(x)
    assert torch.equal(got, want)
    (tmp_path / "alone").mkdir()
    (tmp_path / "m.pt").rename(tmp_path / "alone" / "m.pt")
    torch.save(x, tmp_path / "alone" / "x.pt")
    (loaded,) = load_pickles_in_clean_process(tmp_path / "alone")
    assert torch.equal(loaded["y"], want) and loaded["record"] == "dict" and loaded["stages"] >= 1


def test_saved_model_loads_without_cspify_and_matches(tmp_path):
    """save_model (what -o writes): whole, scoped and folded conversions, and a host framework's
    attributes, load where cspify cannot be imported, and give the converted model's outputs."""
    from cspify.fuse import fold_norms
    from cspify.host import keep_host_attributes
    from cspify.record import conversion_of

    host = nn.Module()
    host.type, host.names = "models.TinyResNet", {0: "cat"}
    residual = cspify.convert(randomize_norms(seeded(TinyResNet)), torch.randn(2, 3, 16, 16)).eval()
    keep_host_attributes(host, residual)
    scoped = cspify.convert(seeded(torchvision.models.resnet18).eval(), torch.randn(1, 3, 64, 64), scope="layer1").eval()
    cases = {
        "residual": (residual, torch.randn(3, 3, 16, 16)),
        "dense": (cspify.convert(randomize_norms(seeded(TinyDenseNet)), torch.randn(2, 3, 16, 16)).eval(), torch.randn(1, 3, 16, 16)),
        "scoped": (scoped, torch.randn(2, 3, 64, 64)),
        "folded": (fold_norms(residual, torch.randn(2, 3, 16, 16)).model, torch.randn(2, 3, 16, 16)),
    }
    expected, folders = {}, []
    for name, (model, x) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        save_model(model, str(folder / "m.pt"))
        torch.save(x, folder / "x.pt")
        with torch.no_grad():
            expected[name] = model(x)
        folders.append(folder)
    assert conversion_of(residual) is not None and conversion_of(scoped, "layer1") is not None  # left as they were
    loaded = dict(zip(cases, load_pickles_in_clean_process(*folders)))
    for name, got in loaded.items():
        assert torch.equal(got["y"], expected[name]), f"{name}: {(got['y'] - expected[name]).abs().max()}"
    assert loaded["residual"]["type"] == "models.TinyResNet" and loaded["residual"]["names"] == {0: "cat"}
    assert loaded["residual"]["record"] == "dict" and loaded["residual"]["stages"] == len(conversion_of(residual).stages)


def test_save_model_refuses_what_would_still_need_cspify(tmp_path):
    from cspify.config import CSPConfig

    gm = cspify.convert(seeded(TinyResNet), torch.randn(1, 3, 16, 16))
    gm.options = CSPConfig()  # a cspify object on the module itself, not a record in meta
    with pytest.raises(ExportError, match=r"would need cspify to load \(cspify\.config\.CSPConfig\)"):
        with Outputs() as out:
            out.path(str(tmp_path / "m.pt"), lambda tmp: save_model(gm, tmp), suffix=".pt")
    assert listing(tmp_path) == []


CUSTOM_LEAF = TINY_RES.replace("class TinyRes(nn.Module):", """class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class TinyRes(nn.Module):""").replace("self.head = nn.Sequential(", "self.scale = Scale()\n        self.head = nn.Sequential(").replace(
    "return self.head(self.layer(self.stem(x)))", "return self.head(self.scale(self.layer(self.stem(x))))")


def test_a_layer_of_the_model_file_gets_a_note(tmp_path, monkeypatch, models):
    """Scale is defined in the model file: -o writes the file, and says where it loads."""
    path = models("tiny.py", CUSTOM_LEAF)
    assert "class Scale" in path.read_text()
    monkeypatch.chdir(tmp_path)
    result = cli("convert", path, "--leaf", "scale", "-o", "m.pt", "-q")
    assert result.exit_code == 0, result.output
    assert "note: m.pt loads only where Scale (defined in" in result.stderr and "--onnx" in result.stderr
    result = cli("convert", RESNET, *SMALL, "-o", "plain.pt", "-q")
    assert result.exit_code == 0 and "note:" not in result.stderr


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


class WithCustomLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = seeded(TinyResNet)
        self.custom = Custom()

    def forward(self, x):
        return self.custom(self.net(x))


def test_a_custom_layer_is_refused_by_name():
    gm = cspify.convert(WithCustomLeaf().eval(), torch.randn(1, 3, 16, 16), leaf_modules=["custom"])
    with pytest.raises(ExportError, match=r"layer custom \(.*Custom\) cannot be written as source") as info:
        source_of(gm)
    assert info.value.exit_code == 6 and "-o" in info.value.hint


def test_a_scoped_conversion_is_refused_clearly():
    model = WithCustomLeaf().eval()
    whole = cspify.convert(model, torch.randn(1, 3, 16, 16), scope="net")
    with pytest.raises(ExportError, match="without --scope"):
        source_of(whole)


def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    result = cli("convert", RESNET, *SMALL, "-o", "m.pt", "--onnx", "m.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["m.onnx", "m.pt"]
    model = torch.load("m.pt", weights_only=False).eval()
    session = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (2, 1, 3):  # exported at batch 2: the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = model(x).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        diff = float(abs(got - want).max())
        print(f"batch {batch}: onnxruntime vs PyTorch: max abs difference {diff:.3g}")
        assert got.shape == want.shape and diff < 1e-4


def test_onnx_static_keeps_the_example_batch_size(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    result = cli("convert", RESNET, *SMALL, "--onnx", "m.onnx", "--onnx-static", "-q")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]
    assert session.run(None, {name: torch.randn(2, 3, 32, 32).numpy()})[0].shape[0] == 2
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {name: torch.randn(1, 3, 32, 32).numpy()})


def test_onnx_static_without_onnx_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("convert", RESNET, *SMALL, "-o", "m.pt", "--onnx-static", "-q")
    assert result.exit_code == 2 and "error: --onnx-static applies to an ONNX export" in result.stderr
    assert "hint: add --onnx PATH" in result.stderr and listing(tmp_path) == []


def test_a_model_that_fixes_its_batch_needs_onnx_static(tmp_path):
    """torch.export keeps the batch axis fixed where the model does (a reshape to the example
    batch size) without an error; write_onnx refuses, and dynamic_batch=False exports it."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            return self.fc(x.reshape(2, 12))

    gm = torch.fx.symbolic_trace(FixedBatch())
    x = torch.randn(2, 3, 4)
    with pytest.raises(ExportError, match="fixes its batch size at 2") as info:
        with Outputs() as out:
            out.path(str(tmp_path / "f.onnx"), lambda tmp: write_onnx(gm, (x,), tmp), suffix=".onnx")
    assert "--onnx-static" in info.value.hint and listing(tmp_path) == []
    write_onnx(gm, (x,), str(tmp_path / "f.onnx"), dynamic_batch=False)
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert float(abs(got - gm(x).numpy()).max()) < 1e-5


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    """-o and --export-dir are staged; the ONNX step fails; neither lands, no temporary is left."""
    monkeypatch.chdir(tmp_path)

    def broken(model, inputs, path, **options):
        Path(path).write_bytes(b"half")
        raise ExportError("torch.onnx.export cannot export the converted model.", "save it with -o")

    monkeypatch.setattr("cspify.cli.convert.write_onnx", broken)
    result = CliRunner().invoke(main, ["convert", str(RESNET), *SMALL, "-o", "m.pt", "--export-dir", "csp",
                                       "--onnx", "m.onnx", "--json", "r.json", "-q"])
    assert result.exit_code == 6, result.output
    assert "error: torch.onnx.export cannot export" in result.stderr and "Traceback" not in result.stderr
    assert listing(tmp_path) == []


def test_force_replaces_an_export_dir_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "csp").mkdir()
    (tmp_path / "csp" / "stale.txt").write_text("old")
    result = cli("convert", RESNET, *SMALL, "--export-dir", "csp", "-q")
    assert result.exit_code == 6 and "csp already exists" in result.stderr
    assert listing(tmp_path) == ["csp", "csp/stale.txt"]
    result = cli("convert", RESNET, *SMALL, "--export-dir", "csp", "--force", "-q")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["csp", "csp/__init__.py", "csp/model.py", "csp/weights.pt"]


def test_outputs_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with Outputs() as out:
            out.file(str(tmp_path / "a.txt"), lambda f: f.write("a"))
            out.folder(str(tmp_path / "d"), lambda d: Path(d, "x").write_text("x"))
            raise RuntimeError("later step fails")
    assert listing(tmp_path) == []
    (tmp_path / "a.txt").write_text("keep")
    with pytest.raises(OutputError, match="already exists"):
        with Outputs() as out:
            out.file(str(tmp_path / "a.txt"), lambda f: f.write("new"))
    assert (tmp_path / "a.txt").read_text() == "keep" and listing(tmp_path) == ["a.txt"]


def test_atomic_file_replaces_or_leaves_things_as_they_were(tmp_path):
    from cspify.files import atomic_file

    target = tmp_path / "run.ckpt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"half")
            raise RuntimeError("stopped while writing")
    assert listing(tmp_path) == ["run.ckpt"] and target.read_bytes() == b"old"
    with atomic_file(target) as f:
        f.write(b"new")
    assert listing(tmp_path) == ["run.ckpt"] and target.read_bytes() == b"new"
    with pytest.raises(OutputError, match="cannot write the checkpoint") as caught:
        with atomic_file(tmp_path / "nowhere" / "x.ckpt", name="the checkpoint 'x.ckpt'", hint="choose a folder"):
            pass
    assert caught.value.hint == "choose a folder"


# ---------------------------------------------------------------- torch.fx's private table


def test_torch_fx_custom_builtins_still_give_what_export_reads():
    """export.fx_builtin_import reads torch.fx's private ``_custom_builtins`` (the names fx's
    generated code uses without importing them). This fails when upstream renames the table
    or changes the entries a converted model's source needs."""
    import math

    from torch.fx.graph import _custom_builtins

    from cspify.export import fx_builtin_import

    for name in ("inf", "nan", "NoneType", "device", "torch"):
        entry = _custom_builtins[name]
        assert isinstance(entry.import_str, str) and hasattr(entry, "obj"), name
        namespace: dict = {}
        exec(entry.import_str, namespace)  # noqa: S102  the line export writes into model.py
        same = namespace[name] is entry.obj or (name == "nan" and math.isnan(namespace[name]))
        assert same or namespace[name] == entry.obj, f"{entry.import_str!r} does not bind {name}"
        assert fx_builtin_import(name) == entry.import_str
    assert fx_builtin_import("not_a_builtin_xyz") is None


def test_source_with_fx_builtins_in_its_forward_compiles():
    """A forward that uses inf (clamp) and a device gets their imports from the table above."""

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.clamp(x, max=float("inf")).to(torch.device("cpu"))

    gm = torch.fx.symbolic_trace(Clamp())
    text = source_of(gm)
    assert "from math import inf" in text and "from torch import device" in text
    namespace: dict = {}
    exec(compile(text, "model.py", "exec"), namespace)  # noqa: S102
    x = torch.randn(2, 3)
    assert torch.equal(namespace["ClampCSP"]()(x), x)
