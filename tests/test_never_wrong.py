"""Never a wrong model: random residual networks of the kinds the rewrite cannot see at a
glance (hypothesis), each converted correctly or refused cleanly.

Drawn: a channels-first (N,C,H,W) or channels-last (N,H,W,C) stream whose blocks permute
around their convs, or a "mixed" one whose blocks read it with a conv over C and a linear
layer over W (no clear channel axis: it must be refused); per-channel or shared activations (``nn.PReLU(C)``, ``nn.PReLU()``);
convs under ``weight_norm`` / ``spectral_norm`` (parametrizations and the older hooks); a
lazy stem; functional dropout reading ``self.training`` or an auxiliary output in training
mode only; a plain, scaled (``x * 0.5 + f(x)``) or ``torch.add(..., alpha=)`` shortcut.

Asserted: ``convert`` returns a model or raises a CspifyError that is not "a bug in
cspify"; a returned model is a drop-in replacement (``cspify.verify``), in train mode as
in eval mode; every converted stage's bypass is the base's slice along the stream's real
channel axis; outputs keep their dtypes under bf16 autocast; the user's model is untouched.

    python -m pytest tests/test_never_wrong.py                            # profile "ci"
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_never_wrong.py    # the long run (benchmarks/fuzz.sh)
"""

from __future__ import annotations

import copy
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cspify
from cspify.errors import CspifyError
from cspify.verify import drop_in_problems, outputs

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

C, SIDE = 8, 6


def conv(cin: int, cout: int, param: str, lazy: bool = False) -> nn.Module:
    layer = nn.LazyConv2d(cout, 3, padding=1) if lazy else nn.Conv2d(cin, cout, 3, padding=1)
    if param == "weight_norm":
        return nn.utils.parametrizations.weight_norm(layer)
    if param == "spectral_norm":
        return nn.utils.parametrizations.spectral_norm(layer)
    if param == "old_weight_norm":
        return nn.utils.weight_norm(layer)
    if param == "old_spectral_norm":
        return nn.utils.spectral_norm(layer)
    return layer


def act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU(), "prelu_c": nn.PReLU(C), "prelu_1": nn.PReLU()}[kind]


class Block(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.a, self.b = conv(C, C, spec["param"]), conv(C, C, "none")
        self.norm = nn.BatchNorm2d(C) if spec["norm"] else nn.Identity()
        self.act = act(spec["act"])
        self.mix = nn.Linear(SIDE, SIDE) if spec["layout"] == "mixed" else None

    def forward(self, x):
        last = self.spec["layout"] == "last"
        y = x.permute(0, 3, 1, 2) if last else x
        y = self.act(self.norm(self.a(y)))
        if self.spec["mode"] == "dropout":
            y = F.dropout(y, 0.2, self.training)
        y = self.b(y)
        y = y.permute(0, 2, 3, 1) if last else y
        if self.mix is not None:
            y = y * self.mix(x)
        if self.spec["shortcut"] == "scaled":
            return x * 0.5 + y
        if self.spec["shortcut"] == "alpha":
            return torch.add(y, x, alpha=0.5)
        return x + y


class Net(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.stem = conv(3, C, "none", lazy=spec["lazy"])
        self.blocks = nn.Sequential(*[Block(spec) for _ in range(spec["depth"])])
        self.head = nn.Linear(C, 4)
        self.aux = nn.Linear(C, 2)

    def forward(self, x):
        x = self.stem(x)
        if self.spec["layout"] == "last":
            x = self.blocks(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.blocks(x)
        pooled = x.mean((2, 3))
        if self.spec["mode"] == "aux" and self.training:
            return self.head(pooled), self.aux(pooled)
        return self.head(pooled)


specs = st.fixed_dictionaries({
    "layout": st.sampled_from(["first", "last", "mixed"]),
    "act": st.sampled_from(["relu", "prelu_c", "prelu_1"]),
    "param": st.sampled_from(["none", "weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"]),
    "norm": st.booleans(),
    "lazy": st.booleans(),
    "mode": st.sampled_from(["none", "dropout", "aux"]),
    "shortcut": st.sampled_from(["plain", "scaled", "alpha"]),
    "depth": st.integers(2, 3),
    "train": st.booleans(),
})


def gist(message: str) -> str:
    """A refusal's reason without names and numbers, so alike refusals count together."""
    reason = message.split(": ", 1)[1] if message.startswith("none of the") else message
    return re.sub(r"'[^' ]*'|\d+", "_", reason)[:110]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors; a lazy module's parameter must still be uninitialised."""
    lazy = nn.parameter.UninitializedTensorMixin
    return isinstance(b, lazy) if isinstance(a, lazy) else not isinstance(b, lazy) and torch.equal(a, b)


def stream_axis(spec: dict) -> int | None:
    """The axis the stream's layers read as channels; None where they disagree."""
    return {"first": 1, "last": 3, "mixed": None}[spec["layout"]]


@given(specs)
def test_converted_correctly_or_refused_cleanly(spec):
    torch.manual_seed(0)
    model = Net(spec).train(spec["train"])
    x = torch.randn(2, 3, SIDE, SIDE)
    before = copy.deepcopy(model.state_dict())
    try:
        csp = cspify.convert(model, x)
    except CspifyError as error:
        assert "bug in cspify" not in error.message, error.message
        event(f"refused: {gist(error.message)}")
        return
    event(f"converted ({spec['layout']}, {spec['param']}, {spec['act']}, {spec['shortcut']})")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(same(before[k], after[k]) for k in before)
    model.train(spec["train"])
    assert drop_in_problems(model, csp, x) == []
    for training in (True, False):
        model.train(training)
        csp.train(training)
        with torch.no_grad():
            assert [t.shape for t in outputs(model(x))] == [t.shape for t in outputs(csp(x))]
    model.eval()
    csp.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in outputs(model(x))] == [t.dtype for t in outputs(csp(x))]
    nodes = {n.name: n for n in csp.graph.nodes}
    for stage in cspify.conversion_of(csp).converted:
        bypass = next(nodes[n] for n in stage.added if n.endswith("_bypass"))
        base, axis = bypass.args[0], bypass.args[1]
        rank = len(base.meta["tensor_meta"].shape)
        assert stream_axis(spec) is not None, f"{stage.name} converted though its channel axis is not clear"
        assert axis % rank == stream_axis(spec), f"{stage.name} split along axis {axis}, not the channels"
