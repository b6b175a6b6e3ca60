"""Pyramid compression (cspify/pyramid.py, ``pyramid="maxout"``): Maxout over pairs of the
channels of a concat that fuses pyramid levels, the conv reading it narrowed and calibrated."""

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.calibrate import calibrate
from cspify.errors import ConfigError
from tiny_models import cbr, seeded

X = torch.randn(1, 3, 16, 16)


class FPN(nn.Module):
    """Two levels; the coarse one upsampled and concatenated with the fine one, one conv reading it."""

    def __init__(self, lateral=16):
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.c3 = nn.Sequential(cbr(16, 16, 3), cbr(16, 16, 3))
        self.down = cbr(16, 32, 3, stride=2)
        self.c4 = nn.Sequential(cbr(32, 32, 3), cbr(32, 32, 3))
        self.lateral, self.up = cbr(32, lateral, 1), nn.Upsample(scale_factor=2)
        self.fuse, self.out = cbr(16 + lateral, 16, 3), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        p3 = self.c3(self.stem(x))
        p4 = self.c4(self.down(p3))
        return self.out(self.fuse(torch.cat([self.up(self.lateral(p4)), p3], 1))), p4


def test_a_pyramid_concat_read_by_one_conv_is_compressed_by_maxout():
    model = seeded(FPN)
    csp = cspify.convert(model, X, pyramid="maxout")
    (fusion,) = cspify.conversion_of(csp).fusions
    assert (fusion.module, fusion.channels, fusion.groups) == ("fuse.0", 32, 2)
    assert csp.get_submodule("fuse.0").in_channels == 16 and model.fuse[0].in_channels == 32
    assert any("compressed by Maxout over 2 channels (32 -> 16)" in note for note in cspify.conversion_of(csp).notes)
    assert [o.shape for o in csp(X)] == [o.shape for o in model(X)]
    report = cspify.compare(model, csp, X)
    assert report.converted.cio_bytes < report.original.cio_bytes


def test_without_the_option_and_off_the_pyramid_nothing_is_compressed():
    model = seeded(FPN)
    assert cspify.conversion_of(cspify.convert(model, X)).fusions == ()
    # an odd-width level: a pair would mix two levels, so the concat stays
    assert cspify.conversion_of(cspify.convert(seeded(FPN, lateral=15), X, pyramid="maxout")).fusions == ()
    with pytest.raises(ConfigError, match="pyramid must be one of none, maxout"):
        cspify.convert(model, X, pyramid="efm")


class SharedFuse(FPN):
    """The conv reading the pyramid concat is called again on a concat of one level."""

    def forward(self, x):
        p3 = self.c3(self.stem(x))
        p4 = self.c4(self.down(p3))
        return self.fuse(torch.cat([self.up(self.lateral(p4)), p3], 1)), self.fuse(torch.cat([p3, p3], 1))


def test_a_conv_the_model_calls_twice_is_not_narrowed_for_one_of_its_calls():
    model = seeded(SharedFuse)
    csp = cspify.convert(model, X, pyramid="maxout")
    assert cspify.conversion_of(csp).fusions == () and csp.get_submodule("fuse.0").in_channels == 32
    assert [o.shape for o in csp(X)] == [o.shape for o in model(X)]


def test_a_dense_concat_of_one_resolution_is_no_pyramid():
    from tiny_models import TinyDenseNet

    csp = cspify.convert(seeded(TinyDenseNet), X, pyramid="maxout")
    assert cspify.conversion_of(csp).fusions == ()


def test_calibration_fits_the_compressed_conv():
    model = seeded(FPN)
    csp = cspify.convert(model, X, pyramid="maxout")
    images = torch.randn(128, 3, 16, 16)
    calibrate(model, csp, images)
    (fit,) = [f for f in csp.meta["cspify.calibrate"].fits if f.role == "pyramid"]
    assert fit.layer == "fuse.0" and fit.error_after < fit.error_before / 10
    with torch.no_grad():
        error = float((csp(images)[0] - model(images)[0]).pow(2).mean() / model(images)[0].pow(2).mean())
    assert error < 0.05


def test_the_compressed_model_exports_to_onnx_and_agrees(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = seeded(FPN)
    csp = cspify.convert(model, X, pyramid="maxout").eval()
    path = tmp_path / "fpn.onnx"
    torch.onnx.export(csp, (X,), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        want = csp(X)
    assert all(torch.allclose(torch.from_numpy(g), w, atol=1e-4) for g, w in zip(got, want))


def test_the_command_line_compresses_with_pyramid_maxout(tmp_path):
    from click.testing import CliRunner

    from cspify.cli import main

    source = tmp_path / "fpn.py"
    source.write_text("import torch\nfrom test_pyramid import FPN\n")
    result = CliRunner().invoke(main, ["convert", f"{source}:FPN", "--input-shape", "1,3,16,16", "--pyramid", "maxout",
                                       "-o", str(tmp_path / "csp.pt"), "-q"])
    assert result.exit_code == 0, result.output
    assert "'fuse.0' reads the pyramid concat 'cat' compressed by Maxout over 2 channels (32 -> 16)" in result.output
    csp = torch.load(tmp_path / "csp.pt", weights_only=False)
    assert csp.get_submodule("fuse.0").in_channels == 16
