"""The issue's promises on real torchvision models (random weights, 224x224)."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import cspify
from tiny_models import flat_renamed
from cspify.measure import measure

torchvision = pytest.importorskip("torchvision")

X = torch.randn(1, 3, 224, 224)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


@pytest.fixture(scope="module")
def converted():
    """Each model converted once at gamma 0.5 with the defaults, and its report."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build(name)
            csp = cspify.convert(model, X, gamma=0.5)
            cache[name] = (model, csp, cspify.compare(model, csp, X))
        return cache[name]

    return get


@pytest.mark.parametrize("name, at_least", [("resnet50", 8.0), ("resnext50_32x4d", 22.0), ("densenet121", 10.0)])
def test_flops_fall_as_the_paper_says(converted, name, at_least):
    model, csp, report = converted(name)
    saved = report.to_dict()["saved_percent"]["flops"]
    assert saved >= at_least, f"{name}: flops fell only {saved}%"
    assert report.converted.params < report.original.params
    with torch.no_grad():
        assert csp(X).shape == model(X).shape == (1, 1000)


def test_resnet50_stages_are_its_four_layers(converted):
    _, _, report = converted("resnet50")
    rows = report.to_dict()["stages"]
    assert [(r["name"], r["kind"]) for r in rows][0] == ("layer1.0", "plain")  # the projection block's conv1-conv2
    rows = rows[1:]
    assert [r["name"] for r in rows] == ["layer1", "layer2", "layer3", "layer4"]
    assert [r["channels"] for r in rows] == [256, 512, 1024, 2048]
    assert [r["bypass_channels"] for r in rows] == [128, 256, 512, 1024]
    assert all(r["converted"] and r["flops_after"] < r["flops_before"] for r in rows)


def test_densenet121_stages_are_its_four_dense_blocks():
    stages = cspify.find_stages(build("densenet121"), X)
    assert [s.name for s in stages] == [f"features.denseblock{i}" for i in range(1, 5)]
    assert [s.kind for s in stages] == ["dense"] * 4
    assert [len(s.blocks) for s in stages] == [6, 12, 24, 16]
    assert [s.channels for s in stages] == [64, 128, 256, 512]
    assert [bool(s.transition) for s in stages] == [True, True, True, False]


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_stages_are_found_by_structure_not_names(name):
    model = build(name)
    plain = cspify.find_stages(model, X)
    anonymous = cspify.find_stages(flat_renamed(model), X)
    shape = lambda stages: [(s.kind, s.channels, len(s.blocks), len(s.transition)) for s in stages]  # noqa: E731
    assert shape(anonymous) == shape(plain)
    assert [s.kind for s in plain] == {"resnet50": ["plain"] + ["residual"] * 4, "densenet121": ["dense"] * 4}[name]


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "densenet121"])
def test_fvcore_agrees_with_torch_flop_counter(converted, name):
    model, csp, report = converted(name)
    for module, fvcore_flops in ((model, report.original.flops), (csp, report.converted.flops)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(X)
        torch_macs = counter.get_total_flops() / 2  # torch counts a multiply-add as two
        assert abs(fvcore_flops - torch_macs) / torch_macs < 0.03


def test_user_model_is_untouched():
    model = build("resnet50").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    csp = cspify.convert(model, X)
    cspify.compare(model, csp, X)
    assert repr(model) == structure
    assert model.training
    current = model.state_dict()
    assert state.keys() == current.keys()
    assert all(torch.equal(state[k], current[k]) for k in state)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_converted_model_trains_and_evaluates(name):
    model = build(name)
    small = torch.randn(2, 3, 64, 64)
    csp = cspify.convert(model, small)
    for mode in (True, False):
        csp.train(mode)
        out = csp(small)
        assert out.shape == (2, 1000) and out.dtype == torch.float32
        out.sum().backward()
        assert all(p.grad is not None for p in csp.parameters() if p.requires_grad)
        csp.zero_grad()


def test_kept_weights_come_from_the_original():
    model = build("resnet50")
    csp = cspify.convert(model, X)
    original, narrowed = model.layer1[1].conv1.weight, csp.get_submodule("layer1.1.conv1").weight
    assert narrowed.shape == (64, 128, 1, 1)
    assert torch.equal(narrowed, original[:, 128:])
    assert torch.equal(csp.get_submodule("layer1.1.conv3").weight, model.layer1[1].conv3.weight[128:])
