"""The op table (cspify/ops.py): one entry per op, read by channels, plan, rewrite, measure
and the in-place pass."""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cspify.narrow import NARROWERS
from cspify.ops import OPS, Op, channel_dim, exact_op, is_leaf, module_rule, register, role_of, rule_for
from cspify.trace import trace


def test_table_maps_layers_to_their_facts():
    assert OPS[nn.Conv2d] == Op("conv", "conv", "conv", "new", fresh_output=True, channel_dim=1)
    assert OPS[nn.Linear].channel_dim == OPS[nn.LayerNorm].channel_dim == -1 and OPS[nn.ReLU].channel_dim is None
    assert OPS[nn.Linear].narrow == "linear" and OPS[nn.Linear].fresh_output
    assert OPS[nn.BatchNorm2d].role == "norm" and OPS[nn.BatchNorm2d].narrow == "per_channel"
    assert OPS[nn.GroupNorm].couple == "group_norm" and OPS[nn.LayerNorm].couple == "layer_norm"
    assert not OPS[nn.InstanceNorm2d].fresh_output
    assert OPS[torch.cat].role == "cat"
    assert OPS[F.relu].role == "act" and OPS[nn.ReLU].narrow is None and not OPS[nn.ReLU].fresh_output
    assert torch.roll not in OPS


def test_memory_facts():
    views = [torch.narrow, operator.getitem, torch.flatten, torch.permute, torch.reshape, "view", "expand_as",
             "contiguous", nn.Identity, nn.Flatten, nn.Unflatten]
    assert all(OPS[op].returns == "view" for op in views)
    assert all(OPS[op].returns == "inplace" for op in (operator.iadd, operator.imul, operator.isub, torch.relu_, "add_"))
    assert all(OPS[op].returns == "none" for op in ("size", "dim", getattr))
    assert OPS[nn.ReLU].returns == OPS[torch.add].returns == "new"


def test_views_and_inplace_ops_without_channel_rule_have_no_role():
    for op in (torch.narrow, torch.squeeze, operator.isub, torch.relu_, nn.Unflatten):
        assert OPS[op].role is None and OPS[op].couple is None


def test_slices_chunks_and_splits_are_views_with_a_channel_rule():
    assert OPS[operator.getitem] == Op(role="index", couple="getitem", returns="view")
    for op in (torch.chunk, torch.split, "chunk", "split"):
        assert OPS[op] == Op(role="split", couple="split", returns="view")


def test_every_narrow_the_table_names_exists():
    named = {op.narrow for op in OPS.values() if op.narrow is not None}
    assert named <= set(NARROWERS), named - set(NARROWERS)


def test_one_entry_per_op():
    with pytest.raises(ValueError, match="one entry per op"):
        register(nn.Conv2d, role="conv", couple="conv")
    with pytest.raises(ValueError, match="returns"):
        register(object(), role="act", returns="copy")
    with pytest.raises(ValueError, match="channel rule"):
        register(object(), role=None, couple="same")


class MyConv(nn.Conv2d):
    pass


class MyBatchNormAct(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = MyConv(3, 4, 1), MyBatchNormAct(4)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)) + x.size(1))


def test_subclasses_inherit_channel_facts_but_not_memory_facts():
    traced = trace(Net(), torch.randn(1, 3, 4, 4))  # keeps both subclasses whole: they have a channel rule
    gm, nodes = traced.gm, traced.nodes
    assert rule_for(nodes["conv"], gm) is OPS[nn.Conv2d] and role_of(nodes["norm"], gm) == "norm"
    assert exact_op(nodes["conv"], gm) is None and exact_op(nodes["norm"], gm) is None
    assert module_rule(MyBatchNormAct(4)).fresh_output  # inherited; the in-place pass asks exact_op
    assert role_of(nodes["size"], gm) == "meta" and exact_op(nodes["size"], gm).returns == "none"
    assert rule_for(nodes["x"], gm) is None


def test_leaves_are_modules_with_a_channel_rule():
    assert is_leaf(nn.BatchNorm2d(4)) and is_leaf(MyConv(1, 1, 1)) and is_leaf(nn.Identity())
    assert not is_leaf(nn.Sequential()) and not is_leaf(nn.Unflatten(1, (2, 2)))


class LayerNorm2d(nn.LayerNorm):
    """As timm's and torchvision's: normalises axis 1 of N,C,H,W."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.prelu_c, self.prelu_1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.PReLU(4), nn.PReLU()
        self.ln, self.ln2d, self.ln_chw = nn.LayerNorm(5), LayerNorm2d(4), nn.LayerNorm([4, 5, 5])
        self.linear = nn.Linear(5, 3)

    def forward(self, x):
        y = self.prelu_1(self.prelu_c(self.bn(self.conv(x))))
        return self.linear(self.ln(y)) + self.ln2d(y).sum() + self.ln_chw(y).sum() + torch.relu(y).sum()


def test_channel_dim_is_the_axis_each_layer_reads_as_channels():
    traced = trace(Layers(), torch.randn(2, 4, 5, 5))
    dims = {name: channel_dim(traced.nodes[name], traced.gm) for name in
            ("conv", "bn", "prelu_c", "prelu_1", "ln", "ln2d", "ln_chw", "linear", "relu")}
    assert dims == {"conv": 1, "bn": 1, "prelu_c": 1, "prelu_1": None, "ln": 3, "ln2d": 1, "ln_chw": None,
                    "linear": 3, "relu": None}


class _PaddedRMSBlock(nn.Module):
    """A residual block with a padding layer before its conv and an RMS norm written out
    (x * rsqrt(mean(x ** 2) + eps) * weight), as timm's CPUBone and MobileNetV5 write them."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(c, c, 3, bias=False)
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        y = self.conv(self.pad(x))
        y = y * torch.rsqrt(y.pow(2).mean((2, 3), keepdim=True) + 1e-5) * self.weight
        return x + torch.relu(y)  # float32 under bf16 autocast, as pow promotes


def test_padding_layers_and_elementwise_math_keep_their_input_channels():
    assert OPS[nn.ZeroPad2d].role == "pool" and OPS[nn.ReflectionPad2d].couple == "same"
    assert all(OPS[op].role == "elementwise" for op in (operator.pow, torch.rsqrt, "pow", "sqrt", "exp"))
    import cspify
    from cspify.verify import drop_in_problems

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _PaddedRMSBlock(16), _PaddedRMSBlock(16)).eval()
    x = torch.randn(2, 3, 8, 8)
    csp = cspify.convert(model, x, kinds="residual")
    assert drop_in_problems(model, csp, x) == []
    assert csp.get_submodule("1.conv").in_channels == 8  # the through part's conv runs at half the width
