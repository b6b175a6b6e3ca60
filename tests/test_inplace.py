"""Restoring the in-place adds torch.fx drops: same numbers, same gradients, and only where safe."""

import copy

import torch
import torch.nn as nn

import cspify
from cspify.inplace import restore_inplace_adds
from cspify.trace import as_inputs, propagate_shapes, trace

from tiny_models import TinyResNet, seeded


def traced(model, x):
    gm = trace(model, as_inputs(x)).gm
    propagate_shapes(gm, as_inputs(x))
    return gm


def inplace_adds(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_"]


def test_residual_adds_become_inplace_with_the_same_outputs_and_gradients():
    model, x = seeded(TinyResNet), torch.randn(2, 3, 16, 16)
    plain = traced(model, x)
    gm = copy.deepcopy(plain)
    assert restore_inplace_adds(gm) == 6 and len(inplace_adds(gm)) == 6
    assert torch.equal(gm(x), plain(x))

    for m in (plain, gm):
        m.train()
        m.zero_grad()
        m(x).square().sum().backward()  # autograd would refuse an in-place write over a tensor it saved
    for (name, a), (_, b) in zip(plain.named_parameters(), gm.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


class Adds(nn.Module):
    """One add per rule: only ``fresh`` may become in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.act = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.narrow = nn.Conv2d(4, 1, 1)
        self.hooked = nn.Conv2d(4, 4, 1)
        self.hooked.register_forward_hook(lambda module, args, out: None)

    def forward(self, x):
        fresh = self.conv(x) + x
        s = self.shared(x)
        shared = s + x  # s is read again below
        after_act = self.act(x) + x  # a ReLU's backward reads its output
        broadcast = self.narrow(x) + x  # 1 channel broadcast to 4
        hooked = self.hooked(x) + x  # a hook may have kept the output
        return fresh, shared + s, after_act, broadcast, hooked


def test_only_safe_adds_become_inplace():
    x = torch.randn(1, 4, 5, 5)
    gm = traced(Adds().eval(), x)
    expected = gm(x)
    assert restore_inplace_adds(gm) == 1
    assert inplace_adds(gm) == ["add"]
    for got, want in zip(gm(x), expected):
        assert torch.equal(got, want)


def test_converted_models_use_inplace_adds():
    model, x = seeded(TinyResNet), torch.randn(1, 3, 16, 16)
    csp = cspify.convert(model, x)
    assert len(inplace_adds(csp)) == 6
    report = cspify.compare(model, csp, x)
    assert report.converted.flops < report.original.flops
