"""Parts (cspify/parts.py): the traceable submodules of a module that tracing keeps whole are
converted on their own, then calibrated, distilled and reported with the rest."""

import copy

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.calibrate import calibrate
from cspify.record import find_conversions
from tiny_models import cbr, seeded

X = torch.randn(1, 3, 16, 16)


class Head(nn.Module):
    """Untraceable (it branches on a tensor), with one traceable conv tower per level, and a
    container (the ModuleList) that is never called itself."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(cbr(8, 16, 3), cbr(16, 16, 3), cbr(16, 16, 3), nn.Conv2d(16, 4, 1)) for _ in range(2))
        self.scale = nn.Conv2d(4, 4, 1)

    def forward(self, levels):
        out = [tower(x) for tower, x in zip(self.towers, levels)]
        if out[0].abs().sum() > 1e9:  # data-dependent control flow: torch.fx keeps the head whole
            out = out[::-1]
        return [self.scale(o) for o in out]


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.body = nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3), cbr(8, 8, 3))
        self.down = cbr(8, 8, 3, stride=2)
        self.head = Head()

    def forward(self, x):
        a = self.body(self.stem(x))
        return self.head([a, self.down(a)])


@pytest.fixture(scope="module")
def detector():
    model = seeded(Detector)
    return model, cspify.convert(model, X)


def test_the_towers_of_a_kept_whole_head_convert_on_their_own(detector):
    model, csp = detector
    record = cspify.conversion_of(csp)
    assert record.kept_whole[0][0] == "head"
    assert record.parts == ("head.towers.0", "head.towers.1")
    assert any("inside 'head', which tracing keeps whole" in note for note in record.notes)
    assert [(scope, [s.kind for s in r.converted]) for scope, r in find_conversions(csp)] == [
        (None, ["plain"]), ("head.towers.0", ["plain"]), ("head.towers.1", ["plain"])]
    assert csp.get_submodule("head.towers.0.1.0").out_channels == 8  # the tower runs its through part
    assert model.head.towers[0][1][0].out_channels == 16  # the user's model is left as it was
    assert [o.shape for o in csp(X)] == [o.shape for o in model(X)]


def test_a_stage_filter_names_the_models_own_stages_so_the_parts_stay(detector):
    model, _ = detector
    csp = cspify.convert(model, X, stages=["body"])
    assert cspify.conversion_of(csp).parts == () and len(find_conversions(csp)) == 1


def test_the_report_has_a_row_per_part_stage_and_its_totals_include_them(detector):
    model, csp = detector
    report = cspify.compare(model, csp, X)
    assert [row.name for row in report.stages] == ["body", "head.towers.0:stage1", "head.towers.1:stage1"]
    towers = sum(row.before.flops - row.after.flops for row in report.stages[1:])
    assert towers > 0 and report.original.flops - report.converted.flops > towers


def test_calibration_fits_the_parts_too(detector):
    model, csp = detector
    csp = copy.deepcopy(csp)
    images = torch.randn(128, 3, 16, 16)

    def error():
        with torch.no_grad():
            return sum(float((a - b).pow(2).mean() / b.pow(2).mean()) for a, b in zip(csp(images), model(images)))

    start = error()
    calibrate(model, csp, images)
    fitted = {fit.stage for fit in csp.meta["cspify.calibrate"].fits}
    assert fitted == {"body", "head.towers.0:stage1", "head.towers.1:stage1"}
    assert error() < start / 100


def test_fine_tuning_distils_every_parts_stage(detector):
    model, csp = detector
    csp = copy.deepcopy(csp)
    tower = csp.get_submodule("head.towers.1.1.0").weight.detach().clone()
    tuned = cspify.finetune(csp, torch.randn(16, 3, 16, 16), teacher=model, batch_size=8, max_steps=1, progress=False)
    run = tuned.meta["cspify.finetune"]
    assert run.settings["stages"] == ["body", "head.towers.0:stage1", "head.towers.1:stage1"]
    assert run.epochs[0].ce is None and run.epochs[0].kd is None and run.epochs[0].feature is not None
    assert not torch.equal(tuned.get_submodule("head.towers.1.1.0").weight, tower)
    assert type(model.head.towers[0]) is nn.Sequential  # the teacher's parts were traced on copies
    assert all(p.requires_grad for p in model.parameters())


def test_parts_false_leaves_them(detector):
    model, _ = detector
    record = cspify.conversion_of(cspify.convert(model, X, parts=False))
    assert record.parts == () and record.converted


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the head's branch on a tensor, traced by the exporter
def test_a_model_with_converted_parts_exports_to_onnx_and_agrees(detector, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    _, csp = detector
    path = tmp_path / "detector.onnx"
    torch.onnx.export(csp.eval(), (X,), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        want = csp(X)
    assert len(got) == len(want) and all(torch.allclose(torch.from_numpy(g), w, atol=1e-4) for g, w in zip(got, want))
