"""Models torch.fx cannot trace whole (scope, leaf modules), and models with several
inputs or outputs (a backbone returning a feature pyramid)."""

import inspect

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import cspify
from cspify.cli import main
from cspify.errors import ConfigError, TraceError

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def detector():
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96
    ).eval()


def test_scope_converts_the_backbone_of_a_detector():
    model, x = detector(), torch.randn(1, 3, 96, 96)
    with pytest.raises(TraceError, match="--scope"):
        cspify.convert(model, x)
    csp = cspify.convert(model, x, scope="backbone.body")
    assert isinstance(csp, type(model)) and csp is not model
    assert isinstance(csp.backbone.body, torch.fx.GraphModule)
    assert not isinstance(model.backbone.body, torch.fx.GraphModule)  # the user's model is untouched
    with torch.no_grad():
        detections = csp([x[0]])
    assert set(detections[0]) == {"boxes", "labels", "scores"}
    report = cspify.compare(model, csp, x, scope="backbone.body")
    assert [row.name for row in report.stages] == ["layer1.0", "layer1", "layer2", "layer3", "layer4"]
    assert report.converted.flops < report.original.flops


def test_scope_that_does_not_exist_says_which_do():
    with pytest.raises(ConfigError, match="no submodule 'backbone.bodyy'") as error:
        cspify.convert(detector(), torch.randn(1, 3, 96, 96), scope="backbone.bodyy")
    assert "backbone" in error.value.hint


def test_feature_pyramid_outputs_keep_their_shapes():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    csp = cspify.convert(model, x)
    with torch.no_grad():
        before, after = model(x), csp(x)
    assert [t.shape for t in after] == [t.shape for t in before] and len(after) == 5


class TwoInputs(nn.Module):
    """Two streams, each through residual blocks, summed."""

    def __init__(self):
        super().__init__()
        self.stems = nn.ModuleList(nn.Conv2d(3, 16, 3, padding=1) for _ in range(2))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16))
            for _ in range(4)
        )

    def forward(self, a, b):
        a, b = self.stems[0](a), self.stems[1](b)
        for block in self.blocks[:2]:
            a = torch.relu(a + block(a))
        for block in self.blocks[2:]:
            b = torch.relu(b + block(b))
        return a + b, a.mean()


def test_several_inputs_and_outputs():
    model = TwoInputs().eval()
    inputs = (torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))
    stages = cspify.find_stages(model, inputs)
    assert len(stages) == 2
    csp = cspify.convert(model, inputs)
    with torch.no_grad():
        assert [t.shape for t in csp(*inputs)] == [t.shape for t in model(*inputs)]


class Gate(nn.Module):
    def forward(self, x):
        return x if x.mean() > 0 else -x  # data-dependent: untraceable


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)) for _ in range(3))
        self.gate = Gate()

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.gate(x)


def test_an_untraceable_helper_is_kept_whole_as_a_leaf_and_said_so():
    model, x = WithGate().eval(), torch.randn(1, 3, 16, 16)
    csp = cspify.convert(model, x)
    assert cspify.conversion_of(csp).leaf_modules == ("gate",)
    assert "gate" in dict(cspify.conversion_of(csp).kept_whole)
    assert "'gate' kept whole (torch.fx cannot trace it" in str(cspify.compare(model, csp, x))
    named = cspify.convert(model, x, leaf_modules=["gate"])
    assert cspify.conversion_of(named).kept_whole == ()
    with torch.no_grad():
        assert csp(x).shape == named(x).shape == model(x).shape


def test_cli_scope_and_leaf(tmp_path):
    source = tmp_path / "gated.py"
    source.write_text(
        "import torch\nimport torch.nn as nn\n\n" + inspect.getsource(Gate) + "\n" + inspect.getsource(WithGate)
        + "\ndef example_inputs():\n    return torch.randn(1, 3, 16, 16)\n"
    )
    runner = CliRunner()
    result = runner.invoke(main, ["analyze", f"{source}:WithGate", "--leaf", "gate", "-q"])
    assert result.exit_code == 0, result.output
    assert "blocks " in result.output and "saved" in result.output
    result = runner.invoke(main, ["analyze", f"{source}:WithGate", "--scope", "blocks", "-q"])
    assert result.exit_code == 2 and "never called" in result.output
    result = runner.invoke(main, ["convert", f"{source}:WithGate", "--scope", "blocks.0", "-q"])
    assert result.exit_code == 5 and "no residual, dense, aggregation or plain stage" in result.output


def test_scope_keeps_the_host_frameworks_attributes_through_deepcopy_and_pickling():
    """A framework that routes layers by attributes it set on them (ultralytics' ``f``,
    ``i``, ``type``) finds them on the converted replacement, and on its copies."""
    import copy
    import pickle

    from tiny_models import TinyResNet

    torch.manual_seed(0)
    model = nn.Sequential(TinyResNet().eval())
    model[0].f, model[0].i, model[0].type = -1, 0, "TinyResNet"
    csp = cspify.convert(model, torch.randn(1, 3, 32, 32), scope="0")
    copied, saved = copy.deepcopy(csp), pickle.loads(pickle.dumps(csp))
    for part in (csp[0], copied[0], saved[0], pickle.loads(pickle.dumps(copied))[0], copy.deepcopy(saved)[0]):
        assert isinstance(part, torch.fx.GraphModule)
        assert (part.f, part.i, part.type) == (-1, 0, "TinyResNet")
