"""Graph helpers (cspify/graph.py) shared by the rules and the passes."""

import torch
import torch.nn as nn

from cspify.graph import cat_args, region_between, shape, single_entry, tensor_inputs, with_constants
from cspify.trace import trace


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        y = self.a(x)
        z = self.b(y) * self.scale
        return torch.cat([y, z], 1), torch.cat(tensors=(y, z), dim=-3), y.size(0)


def traced():
    return trace(Net(), torch.randn(1, 3, 5, 5))


def test_shape_and_tensor_inputs():
    t = traced()
    assert shape(t.nodes["a"]) == (1, 4, 5, 5) and shape(t.nodes["size"]) is None
    assert [n.name for n in tensor_inputs(t.nodes["mul"])] == ["b", "scale"]


def test_cat_args_positional_and_keyword():
    t = traced()
    parts, dim = cat_args(t.nodes["cat"])
    assert [p.name for p in parts] == ["a", "mul"] and dim == 1
    parts, dim = cat_args(t.nodes["cat_1"])
    assert [p.name for p in parts] == ["a", "mul"] and dim == -3


def test_regions():
    t = traced()
    region = region_between(t.graph, "a", "mul")
    assert region == {"b", "mul"}
    assert not single_entry(t, {"mul"}, "a")  # mul also reads b, from outside the region
    assert single_entry(t, region, "a")  # the parameter is a constant
    assert with_constants(t, region) == {"b", "mul", "scale"}
