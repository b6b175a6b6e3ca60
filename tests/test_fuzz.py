"""Fuzzing ``convert`` with random small residual and dense networks (hypothesis).

Each example builds a network from drawn choices (depths, widths, groups, kernel sizes,
BatchNorm / GroupNorm / no norm, activations, pre- or post-activation, squeeze-and-
excitation) and checks: ``convert`` succeeds or raises a CspifyError with a reason; on
success the output shape is unchanged, fvcore flops do not grow, forward and backward
run, and the original model is untouched.

    python -m pytest tests/test_fuzz.py                           # profile "ci": 25 examples
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py   # >= 500 examples
    benchmarks/fuzz.sh                                            # the same, with statistics
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cspify
from cspify.measure import measure
from cspify.record import conversion_of

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky": lambda: nn.LeakyReLU(0.1), "none": nn.Identity}


def norm_layer(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(next(g for g in (4, 2, 1) if c % g == 0), c)
    return nn.Identity()


class SE(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc(pool(x)))."""

    def __init__(self, c: int):
        super().__init__()
        hidden = max(1, c // 4)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


class ResBlock(nn.Module):
    """Post-activation act(x + f(x)) or pre-activation x + f(act(norm(x))); a projection if needed."""

    def __init__(self, cin, cout, stride, spec):
        super().__init__()
        self.pre = spec["pre"]
        k, g = spec["kernel"], spec["groups"]
        width = max(g, (cout // 2) // g * g) if spec["bottleneck"] else cout
        if self.pre:
            self.f = nn.Sequential(
                norm_layer(spec["norm"], cin), ACTS[spec["act"]](), nn.Conv2d(cin, width, k, stride, k // 2, bias=False),
                norm_layer(spec["norm"], width), ACTS[spec["act"]](), nn.Conv2d(width, cout, k, 1, k // 2, groups=g, bias=False),
            )
        else:
            self.f = nn.Sequential(
                nn.Conv2d(cin, width, 1 if spec["bottleneck"] else k, stride, 0 if spec["bottleneck"] else k // 2, bias=False),
                norm_layer(spec["norm"], width), ACTS[spec["act"]](),
                nn.Conv2d(width, width, k, 1, k // 2, groups=g, bias=False), norm_layer(spec["norm"], width),
                ACTS[spec["act"]](), nn.Conv2d(width, cout, 1, bias=False), norm_layer(spec["norm"], cout),
            )
        self.se = SE(cout) if spec["se"] else nn.Identity()
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(spec["norm"], cout))
        self.act = nn.Identity() if self.pre else ACTS[spec["act"]]()

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(self.se(self.f(x)) + shortcut)


class RandomResNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        c = spec["channels"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), norm_layer(spec["norm"], c), ACTS[spec["act"]]())
        stages = []
        for i, depth in enumerate(spec["depths"]):
            cin, cout = c * 2 ** max(0, i - 1), c * 2**i
            stages.append(nn.Sequential(*[ResBlock(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1, spec) for j in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c * 2 ** (len(spec["depths"]) - 1), 3))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class DenseUnit(nn.Module):
    def __init__(self, cin, growth, spec):
        super().__init__()
        k, norm, act = spec["kernel"], spec["norm"], spec["act"]
        if spec["pre"]:
            self.f = nn.Sequential(norm_layer(norm, cin), ACTS[act](), nn.Conv2d(cin, growth, k, 1, k // 2, bias=False))
        else:
            self.f = nn.Sequential(nn.Conv2d(cin, growth, k, 1, k // 2, bias=False), norm_layer(norm, growth), ACTS[act]())
        self.se = SE(growth) if spec["se"] else nn.Identity()

    def forward(self, x):
        return self.se(self.f(x))


class RandomDenseNet(nn.Module):
    """Incremental x = cat([x, f(x)]) or list-style cat(features) dense blocks, transitions between."""

    def __init__(self, spec):
        super().__init__()
        c, growth = spec["channels"], spec["growth"]
        self.incremental = spec["incremental"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), norm_layer(spec["norm"], c), ACTS[spec["act"]]())
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        for i, depth in enumerate(spec["depths"]):
            self.blocks.append(nn.ModuleList(DenseUnit(c + j * growth, growth, spec) for j in range(depth)))
            c += depth * growth
            if i < len(spec["depths"]) - 1:
                self.transitions.append(nn.Sequential(norm_layer(spec["norm"], c), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)))
                c //= 2
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if self.incremental:
                for unit in block:
                    x = torch.cat([x, unit(x)], 1)
            else:
                features = [x]
                for unit in block:
                    features.append(unit(torch.cat(features, 1)))
                x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.head(x)


common = dict(
    norm=st.sampled_from(["bn", "gn", "none"]),
    act=st.sampled_from(sorted(ACTS)),
    pre=st.booleans(),
    se=st.booleans(),
    kernel=st.sampled_from([1, 3, 5]),
)
residual_specs = st.fixed_dictionaries(dict(
    common, family=st.just("residual"), channels=st.sampled_from([4, 8, 12, 16]),
    depths=st.lists(st.integers(1, 3), min_size=1, max_size=2), groups=st.sampled_from([1, 2, 4]),
    bottleneck=st.booleans(),
))
dense_specs = st.fixed_dictionaries(dict(
    common, family=st.just("dense"), channels=st.sampled_from([4, 8, 12]), growth=st.sampled_from([2, 4, 6]),
    depths=st.lists(st.integers(1, 4), min_size=1, max_size=2), incremental=st.booleans(),
))


def build(spec) -> nn.Module:
    torch.manual_seed(0)
    return (RandomResNet if spec["family"] == "residual" else RandomDenseNet)(spec).eval()


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@given(spec=st.one_of(residual_specs, dense_specs), gamma=st.sampled_from([0.25, 0.5, 0.75]),
       fusion=st.sampled_from(["last", "first"]), hidden=st.sampled_from(["keep", "scale"]))
def test_convert_random_network(spec, gamma, fusion, hidden):
    model = build(spec)
    x = torch.randn(2, 3, 8, 8)
    before = state(model)
    modules_before = [type(m) for m in model.modules()]
    with torch.no_grad():
        want = model(x).shape  # the generated network itself runs
    try:
        csp = cspify.convert(model, x, gamma, fusion=fusion, hidden=hidden)
    except cspify.CspifyError as error:
        assert error.message and error.hint, f"a CspifyError without a reason: {error!r}"
        assert "bug in cspify" not in error.message, error.message
        event(f"refused ({spec['family']}): {type(error).__name__}: {_gist(error.message)}")
        return
    finally:
        after = state(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), "model changed"
        assert [type(m) for m in model.modules()] == modules_before and not model.training
    with torch.no_grad():
        assert csp.eval()(x).shape == want
    flops_before, flops_after = measure(model, x).flops, measure(csp, x).flops
    assert flops_after <= flops_before, f"flops grew with fusion {fusion}: {flops_before} -> {flops_after}"
    csp.train()
    csp(x).square().mean().backward()
    assert any(p.grad is not None for p in csp.parameters())
    converted = len(conversion_of(csp).converted)
    event(f"converted ({spec['family']}, fusion {fusion}): {converted} of {len(conversion_of(csp).stages)} stages")


def _gist(message: str) -> str:
    """A message without its numbers and names, so alike refusals count together."""
    import re

    return re.sub(r"'[^']*'|\d+", "_", message)[:90]


@pytest.mark.parametrize("spec", [
    dict(family="residual", channels=8, depths=[2, 2], groups=1, bottleneck=True, norm="bn", act="relu",
         pre=False, se=False, kernel=3),
    dict(family="dense", channels=8, growth=4, depths=[3], incremental=True, norm="bn", act="relu", pre=True,
         se=False, kernel=3),
], ids=["residual", "dense"])
def test_the_generators_build_convertible_networks(spec):
    """The plainest draw of each family converts: the fuzzer exercises real conversions."""
    model = build(spec)
    x = torch.randn(2, 3, 8, 8)
    csp = cspify.convert(model, x)
    assert conversion_of(csp).converted
    assert copy.deepcopy(csp)(x).shape == model(x).shape
