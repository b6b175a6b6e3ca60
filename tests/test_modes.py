"""Forwards that read ``self.training``: the converted model follows the mode it runs in,
or the model is refused in one sentence."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cspify
from cspify.errors import TraceError
from cspify.record import conversion_of

from tiny_models import cbr


class Block(nn.Module):
    def __init__(self, c, p=0.0):
        super().__init__()
        self.a, self.b, self.p = cbr(c, c, 3), cbr(c, c, 3, act=False), p

    def forward(self, x):
        return torch.relu(x + self.b(F.dropout(self.a(x), self.p, self.training)))


class DropoutNet(nn.Module):
    """Functional dropout with training=self.training, as torchvision's DenseNet and timm heads write it."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer = nn.Sequential(Block(8, 0.5), Block(8, 0.5))

    def forward(self, x):
        return F.dropout(self.layer(self.stem(x)), p=0.3, training=self.training)


class AuxNet(nn.Module):
    """An auxiliary output in training mode only, as Inception v3 and GoogLeNet have."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer = nn.Sequential(Block(8), Block(8))
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        y = self.layer(self.stem(x))
        return (y, self.aux(y.mean((2, 3)))) if self.training else y


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_mode_flags_are_read_at_run_time(traced_in):
    model = DropoutNet().train(traced_in == "train")
    csp = cspify.convert(model, X)
    csp.eval()
    assert torch.equal(csp(X), csp(X))  # no dropout in eval mode
    csp.train()
    torch.manual_seed(0)
    first = csp(X)
    assert not torch.equal(first, csp(X))  # dropout in training mode
    assert (first == 0).float().mean() > 0.2


def test_a_branch_on_the_mode_is_refused_with_where_it_parts():
    with pytest.raises(TraceError, match="another path in training mode than in eval mode") as error:
        cspify.convert(AuxNet().eval(), X)
    assert "--leaf" in error.value.hint


def test_the_branch_kept_as_a_leaf_converts():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 8, 3)
            self.layer = nn.Sequential(Block(8), Block(8))
            self.head = AuxHead()

        def forward(self, x):
            return self.head(self.layer(self.stem(x)))

    class AuxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(8, 3)

        def forward(self, y):
            return (y, self.aux(y.mean((2, 3)))) if self.training else y

    model = Wrapped().eval()
    for leaves in (["head"], []):  # named, or found where the paths part: kept whole either way
        csp = cspify.convert(model, X, leaf_modules=leaves)
        assert "head" in conversion_of(csp).leaf_modules
        assert conversion_of(csp).kept_whole == (() if leaves else (("head", KEPT_FOR_MODES),))
        csp.train()
        model.train()
        assert [t.shape for t in csp(X)] == [t.shape for t in model(X)]
        model.eval()


KEPT_FOR_MODES = "its forward takes another path in training mode than in eval mode"


class CachedBias(nn.Module):
    """A layer that caches a computed bias in eval mode and recomputes it in training, as
    timm's EfficientFormer attention does: its graph differs between the modes."""

    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(c))
        self.cache = None

    def forward(self, x):
        if self.training:
            return x + self.bias.view(1, -1, 1, 1) * 2
        if self.cache is None:
            self.cache = self.bias.detach() * 2
        return x + self.cache.view(1, -1, 1, 1)


def test_a_submodule_whose_modes_part_is_kept_whole_and_the_rest_converts():
    model = nn.Sequential(cbr(3, 8, 3), Block(8), Block(8), CachedBias(8), Block(8), Block(8)).eval()
    csp = cspify.convert(model, X)
    record = conversion_of(csp)
    assert dict(record.kept_whole) == {"3": KEPT_FOR_MODES}
    assert record.converted
    for mode in (True, False):
        assert csp.train(mode)(X).shape == model.train(mode)(X).shape
