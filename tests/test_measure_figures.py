"""The report's memory and bottleneck figures, checked against values computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cspify.measure import measure

from tiny_models import TinyResNet, seeded

X = torch.randn(1, 3, 8, 8)  # 64 pixels; float32: 4 bytes per element


def two_convs(inplace: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(8, 4, 1)).eval()


class NarrowThenConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.narrow(self.a(x), 1, 0, 4))


def test_cio_is_conv_input_plus_output_bytes():
    m = measure(two_convs(False), X)
    # conv 3->8: 3*64*4 in + 8*64*4 out; conv 8->4: 8*64*4 in + 4*64*4 out
    assert m.totals.cio_bytes == (768 + 2048) + (2048 + 1024) == 5888


def test_peak_of_a_chain_from_tensor_lifetimes():
    # x (768 B) dies after conv1; at the ReLU its input (2048) and output (2048) are both alive
    assert measure(two_convs(False), X).totals.peak_bytes == 4096
    # an in-place ReLU shares its input's storage: the peak is conv2's input plus output
    assert measure(two_convs(True), X).totals.peak_bytes == 2048 + 1024


def test_a_view_keeps_its_base_alive():
    m = measure(NarrowThenConv().eval(), X)
    # the narrow is a view: the whole 8-channel map (2048 B) lives until conv b has run (+ its 1024 B output)
    assert m.totals.peak_bytes == 2048 + 1024
    assert m.totals.cio_bytes == (768 + 2048) + (1024 + 1024)


def test_bottleneck_is_largest_layer_and_max_over_mean():
    m = measure(two_convs(False), X)
    big, small = 8 * 3 * 9 * 64, 4 * 8 * 64  # fvcore: one multiply-add per flop, bias not counted
    assert m.totals.max_layer_flops == big
    assert m.totals.layer_balance == pytest.approx(big / ((big + small) / 2))
    conv2 = [name for name, target in m.node_targets.items() if target == "2"]
    one = m.stage(conv2)
    assert (one.max_layer_flops, one.layer_balance, one.cio_bytes) == (small, 1.0, 2048 + 1024)


def test_measured_peak_is_not_measured_on_cpu():
    assert measure(two_convs(False), X).totals.measured_peak_bytes is None


class Mixed(nn.Module):
    """Conv, linear, matmul and einsum: every kind of op fvcore counts flops or activations for."""

    def __init__(self):
        super().__init__()
        self.body = TinyResNet()
        self.proj = nn.Linear(5, 6)

    def forward(self, x):
        y = self.proj(self.body(x))
        return torch.einsum("bi,bj->bij", y, y).sum() + (y @ y.T).sum()


def test_fvcore_handles_cover_the_layers_cspify_changes():
    """fvcore's default handles are private (read once, in cspify.measure): fail loudly if
    upstream drops one of the ops whose counts a conversion changes."""
    from cspify.measure import FVCORE_HANDLES

    for op in ("aten::_convolution", "aten::linear", "aten::addmm", "aten::matmul", "aten::einsum", "aten::batch_norm"):
        assert op in FVCORE_HANDLES, op


def test_one_fvcore_pass_counts_as_its_two_analyses():
    import warnings

    from cspify.measure import fvcore_counts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    model, x = seeded(Mixed), (torch.randn(2, 3, 16, 16),)
    flops, activations = fvcore_counts(model, x)
    for analysis, ours in ((FlopCountAnalysis(model, x), flops), (ActivationCountAnalysis(model, x), activations)):
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        theirs = analysis.by_module()
        assert theirs[""] > 0 and set(theirs) == set(ours)
        assert {name: ours[name] for name in theirs} == dict(theirs)


def test_figures_has_one_attribute_per_figures_entry_and_stages_roll_them_up():
    from dataclasses import fields

    from cspify.measure import FIGURES, Figures

    assert [f.name for f in fields(Figures)] == [spec.key for spec in FIGURES]
    assert Figures() == Figures(**{spec.key: spec.empty for spec in FIGURES})
    m = measure(two_convs(False), X)
    assert m.stage([]) == Figures()  # nothing to roll up: every figure is its entry's empty
    whole = m.stage(m.node_targets.keys() | m.node_bytes.keys())
    # every node: the node and layer figures are the totals; module ones sum the modules called
    for spec in FIGURES:
        if spec.per in ("node", "layer"):
            assert getattr(whole, spec.key) == getattr(m.totals, spec.key), spec.key
    assert whole.flops == m.totals.flops and whole.measured_peak_bytes is None


def test_every_figures_entry_says_how_it_is_shown():
    from cspify.measure import FIGURES

    assert len({spec.key for spec in FIGURES}) == len(FIGURES)
    for spec in FIGURES:
        assert spec.per in ("module", "node", "layer", "model") and spec.unit in ("", "B", "ratio"), spec.key
        assert spec.table in ("", "stages", "memory") and bool(spec.table) == bool(spec.column), spec.key
        assert spec.per_stage or not spec.table, spec.key  # a per-stage table needs a per-stage figure
        assert spec.plot is None or "{}" in spec.plot[0], spec.key
