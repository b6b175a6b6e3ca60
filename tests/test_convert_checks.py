"""convert checks what it built against the original on the example inputs: a stage whose
rewrite fails a check is refused with the reason and the others are converted; in-place
adds that would change an output's dtype under autocast are left out of place."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import cspify
import cspify.api
import cspify.rules.residual
from cspify.errors import NoStageError, TraceError

from tiny_models import ChannelsLastNet, LastBlock, TinyResNet, cbr, seeded

X = torch.randn(1, 3, 16, 16)


def failing_for(stages: tuple[str, ...], monkeypatch):
    """Make the converted model fail to run whenever one of ``stages`` is converted."""
    real = cspify.api.propagate_shapes

    def propagate(gm, inputs):
        if any(node.name == f"{stage}_bypass" for stage in stages for node in gm.graph.nodes):
            raise TraceError("made to fail")
        return real(gm, inputs)

    monkeypatch.setattr(cspify.api, "propagate_shapes", propagate)


def test_a_stage_that_fails_a_check_is_refused_and_the_rest_converted(monkeypatch):
    failing_for(("layer1",), monkeypatch)
    csp = cspify.convert(seeded(TinyResNet), X)
    stages = {s.name: s for s in cspify.conversion_of(csp).stages}
    assert stages["layer2"].converted
    assert not stages["layer1"].converted and "failed a check" in stages["layer1"].reason
    assert "made to fail" in stages["layer1"].reason
    assert not any(n.name.startswith("layer1_bypass") for n in csp.graph.nodes)


def test_when_every_stage_fails_nothing_is_returned(monkeypatch):
    failing_for(("layer1", "layer2"), monkeypatch)
    with pytest.raises(NoStageError, match="failed a check"):
        cspify.convert(seeded(TinyResNet), X)


class BiasedHead(nn.Module):
    """A residual body, then an fp32 bias added to a linear's output outside any stage."""

    def __init__(self):
        super().__init__()
        self.body = TinyResNet()
        self.out = nn.Linear(5, 5, bias=False)
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.out(self.body(x)) + self.bias


def test_outputs_keep_their_dtypes_under_autocast():
    model = seeded(BiasedHead)
    csp = cspify.convert(model, X)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert csp(X).dtype == model(X).dtype == torch.float32
    assert any(n.target == "add_" for n in csp.graph.nodes)  # the residual adds stay in place


def test_residual_adds_stay_in_place_where_dtypes_agree():
    model = nn.Sequential(cbr(3, 8, 3), seeded(TinyResNet).layer1)
    csp = cspify.convert(model.eval(), X)
    assert sum(n.target == "add_" for n in csp.graph.nodes) >= 2


def test_a_stream_split_along_another_axis_than_its_channels_is_refused(monkeypatch):
    """The old assumption replayed: a channels-last stream taken as channels-first would be
    split along its height, with every shape kept; the check refuses that stage."""
    monkeypatch.setattr(cspify.rules.residual, "stream_axis", lambda traced, region, seed: (1, ""))
    with pytest.raises(NoStageError) as refused:
        cspify.convert(seeded(ChannelsLastNet, block=functools.partial(LastBlock, norm=False)), X, allow_costlier=True)
    assert "its bypass splits axis 1 of 'permute', but its layers read axis 3" in refused.value.message
    with pytest.raises(NoStageError) as refused:  # with a norm, planning finds it already
        cspify.convert(seeded(ChannelsLastNet), X)
    assert "'layer1.0.norm' treats axis 1 as channels while they are on axis 2" in refused.value.message


def test_the_split_check_refuses_only_the_stage_that_fails_it(monkeypatch):
    real = cspify.api.stream_axis

    def wrong_for_layer1(traced, region, seed):
        return (2, "") if seed.startswith("layer1") else real(traced, region, seed)

    monkeypatch.setattr(cspify.api, "stream_axis", wrong_for_layer1)
    stages = {s.name: s for s in cspify.conversion_of(cspify.convert(seeded(TinyResNet), X)).stages}
    assert stages["layer2"].converted and not stages["layer1"].converted
    assert "its bypass splits axis 1 of 'stem_2', but its layers read axis 2" in stages["layer1"].reason
