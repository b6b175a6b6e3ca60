"""Why stages were left, as a user reads it (cspify.reasons): modules, not torch.fx node
names; a reason's gist; stages refused alike said once."""

from __future__ import annotations

import torch
import torch.nn as nn

from cspify.reasons import brief, gist, grouped, module_names, readable
from cspify.trace import trace


class Conv(nn.Module):
    shared = nn.SiLU()  # one module for every Conv, as ultralytics' default_act is

    def __init__(self, c):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 1), self.shared

    def forward(self, x):
        return self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Conv(4), Conv(4)

    def forward(self, x):
        return torch.cat([self.first(x), self.second(x)], 1)


def names():
    model = Net()
    return module_names(trace(model, torch.randn(1, 4, 8, 8)).gm, model)


def test_a_shared_module_is_named_where_it_was_called():
    named = names()
    assert named["first_conv"] == "'first.conv'" and named["second_conv"] == "'second.conv'"
    acts = sorted(v for k, v in named.items() if "act" in k)
    assert acts == ["'first.act'", "'second.act'"], named  # torch.fx calls both first_act


def test_an_op_is_named_by_what_it_is_and_where():
    assert names()["cat"] == "'cat'"  # in the model's own forward
    assert readable("joins 'second_conv' in 'cat'", names()) == "joins 'second.conv' in 'cat'"
    assert readable("'Shift' has no rule", names()) == "'Shift' has no rule"  # not a node: kept


def test_the_gist_drops_the_details_that_name_nodes():
    reason = "it is a CSP block (its output joins 'a' in 'b', in 'c'); name it (allow_costlier converts it anyway)"
    assert gist(reason) == "it is a CSP block; name it (allow_costlier converts it anyway)"


def test_stages_refused_alike_are_named_once():
    pairs = [("s1", "why"), ("s2", "other"), ("s3", "why"), ("s4", "why"), ("s5", "why"), ("s6", "why")]
    assert grouped(pairs) == "s1, s3, s4, s5 and 1 more: why; s2: other"
    many = [(f"s{i}", f"reason {i}") for i in range(5)]
    assert grouped(many, groups=2) == "s0: reason 0; s1: reason 1; 3 more stages for 3 other reasons"


def test_a_detail_is_dropped_only_where_stages_refused_alike_differ_in_it():
    inside = "it is inside a block (it joins '{}'); name it"
    assert brief([inside.format("a"), inside.format("b"), "failed a check ('c' splits), so left"]) == [
        "it is inside a block; name it", "it is inside a block; name it", "failed a check ('c' splits), so left"]
    assert brief([inside.format("a"), inside.format("a")]) == [inside.format("a")] * 2
