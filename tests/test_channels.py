"""Channel rules: the narrow functions on their own, and the channel-space analysis."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cspify import rules
from cspify.channels import RULES, analyse, fresh_like, narrow_conv, narrow_linear, narrow_per_channel
from cspify.trace import trace
from tiny_models import TinyResNet, cbr, seeded, RollBlock, Shift

X = torch.randn(1, 3, 16, 16)


def zero_others(x, keep):
    """x with every channel outside ``keep`` set to zero."""
    mask = torch.zeros(x.shape[1], dtype=torch.bool)
    mask[list(keep)] = True
    return x * mask.view(1, -1, *([1] * (x.dim() - 2)))


def conv(cin, cout, k=3, groups=1, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)


# --------------------------------------------------------------------------- narrow_conv


def test_narrow_conv_plain_keeps_exact_weights_and_bias():
    old = conv(6, 8)
    w, b = old.weight.detach().clone(), old.bias.detach().clone()
    in_keep, out_keep = (1, 3, 5), (0, 2, 7)
    new = narrow_conv(old, in_keep, out_keep)
    assert (new.in_channels, new.out_channels, new.groups) == (3, 3, 1)
    assert torch.equal(new.weight, w[list(out_keep)][:, list(in_keep)])
    assert torch.equal(new.bias, b[list(out_keep)])
    assert isinstance(new.weight, nn.Parameter) and new.weight.requires_grad
    # the original is untouched
    assert old.weight.shape == (8, 6, 3, 3) and torch.equal(old.weight, w)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(new(x[:, list(in_keep)]), old(zero_others(x, in_keep))[:, list(out_keep)])


def test_narrow_conv_input_only_keeps_all_outputs_and_bias():
    old = conv(8, 5, k=1)
    new = narrow_conv(old, tuple(range(4, 8)), None)
    assert (new.in_channels, new.out_channels) == (4, 5)
    assert torch.equal(new.weight, old.weight[:, 4:])
    assert torch.equal(new.bias, old.bias)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(new(x[:, 4:]), old(zero_others(x, range(4, 8))))


def test_narrow_conv_output_only_without_bias():
    old = conv(4, 8, bias=False)
    new = narrow_conv(old, None, (4, 5, 6, 7))
    assert new.bias is None
    assert (new.in_channels, new.out_channels) == (4, 4)
    assert torch.equal(new.weight, old.weight[4:])


def test_narrow_conv_grouped_with_per_group_keeps():
    old = conv(8, 8, groups=2)  # groups of 4 input and 4 output channels
    in_keep = (1, 3, 5, 6)  # two of each input group
    out_keep = (0, 3, 4, 7)  # two of each output group
    new = narrow_conv(old, in_keep, out_keep)
    assert (new.in_channels, new.out_channels, new.groups) == (4, 4, 2)
    expected = torch.stack([
        old.weight[0, [1, 3]], old.weight[3, [1, 3]],  # group 0 reads in-group columns 1, 3
        old.weight[4, [1, 2]], old.weight[7, [1, 2]],  # group 1 reads channels 5, 6 = columns 1, 2
    ])
    assert torch.equal(new.weight, expected)
    assert torch.equal(new.bias, old.bias[list(out_keep)])
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(new(x[:, list(in_keep)]), old(zero_others(x, in_keep))[:, list(out_keep)])


def test_narrow_conv_grouped_input_only():
    old = conv(8, 6, k=1, groups=2)
    in_keep = (0, 2, 4, 7)
    new = narrow_conv(old, in_keep, None)
    assert (new.in_channels, new.out_channels, new.groups) == (4, 6, 2)
    x = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(new(x[:, list(in_keep)]), old(zero_others(x, in_keep)))


def test_narrow_conv_depthwise_groups_follow_width():
    old = conv(8, 8, groups=8)
    new = narrow_conv(old, (4, 5, 6, 7), None)  # output follows input for depthwise
    assert (new.in_channels, new.out_channels, new.groups) == (4, 4, 4)
    assert torch.equal(new.weight, old.weight[4:])
    assert torch.equal(new.bias, old.bias[4:])
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(new(x[:, 4:]), old(x)[:, 4:])


def test_narrow_conv1d():
    torch.manual_seed(0)
    old = nn.Conv1d(6, 4, 3, padding=1)
    new = narrow_conv(old, (0, 1, 2), (1, 3))
    assert torch.equal(new.weight, old.weight[[1, 3]][:, :3])
    x = torch.randn(1, 6, 7)
    torch.testing.assert_close(new(x[:, :3]), old(zero_others(x, (0, 1, 2)))[:, [1, 3]])


# --------------------------------------------------------------------------- norms, linear


def test_narrow_per_channel_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    bn.num_batches_tracked.fill_(7)
    keep = (1, 2, 5)
    new = narrow_per_channel(bn, keep, keep)
    assert new.num_features == 3
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new, name), getattr(bn, name)[list(keep)]), name
    assert int(new.num_batches_tracked) == 7
    assert bn.num_features == 6 and bn.running_mean.shape == (6,)
    x = torch.randn(2, 6, 4, 4)
    new.eval(), bn.eval()
    torch.testing.assert_close(new(x[:, list(keep)]), bn(x)[:, list(keep)])


def test_narrow_per_channel_input_keep_only():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(4.0))
    new = narrow_per_channel(bn, (2, 3), None)
    assert new.num_features == 2 and torch.equal(new.running_mean, torch.tensor([2.0, 3.0]))


def test_narrow_per_channel_groupnorm():
    torch.manual_seed(0)
    gn = nn.GroupNorm(2, 8)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    keep = (4, 5, 6, 7)
    new = narrow_per_channel(gn, keep, keep)
    assert new.num_channels == 4 and new.num_groups == 2
    assert torch.equal(new.weight, gn.weight[4:]) and torch.equal(new.bias, gn.bias[4:])
    assert new(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)


def test_narrow_per_channel_prelu_per_channel_slopes():
    act = nn.PReLU(8)
    with torch.no_grad():
        act.weight.copy_(torch.arange(8.0) / 10)
    new = narrow_per_channel(act, (4, 5, 6, 7), (4, 5, 6, 7))
    assert new.num_parameters == 4
    assert torch.equal(new.weight, act.weight[4:])


def test_narrow_per_channel_prelu_shared_slope_stays_shared():
    """nn.PReLU() (the default) has ONE slope shared by all channels: nothing to slice."""
    act = nn.PReLU()
    with torch.no_grad():
        act.weight.fill_(0.1)
    new = narrow_per_channel(act, (4, 5, 6, 7), (4, 5, 6, 7))
    assert new.num_parameters == 1
    assert torch.equal(new.weight, torch.tensor([0.1]))
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(new(x), act(x))


def test_narrow_linear():
    torch.manual_seed(0)
    old = nn.Linear(6, 5)
    new = narrow_linear(old, (0, 4, 5), (1, 2))
    assert (new.in_features, new.out_features) == (3, 2)
    assert torch.equal(new.weight, old.weight[[1, 2]][:, [0, 4, 5]])
    assert torch.equal(new.bias, old.bias[[1, 2]])
    x = torch.randn(3, 6)
    torch.testing.assert_close(new(x[:, [0, 4, 5]]), old(zero_others(x, (0, 4, 5)))[:, [1, 2]])


def test_fresh_like_batchnorm_is_fresh_and_new_width():
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.fill_(3.0), bn.bias.fill_(2.0), bn.running_mean.fill_(5.0), bn.running_var.fill_(9.0)
    bn.num_batches_tracked.fill_(4)
    new = fresh_like(bn, 10)
    assert isinstance(new, nn.BatchNorm2d) and new.num_features == 10
    assert torch.equal(new.weight, torch.ones(10)) and torch.equal(new.bias, torch.zeros(10))
    assert torch.equal(new.running_mean, torch.zeros(10)) and torch.equal(new.running_var, torch.ones(10))
    assert int(new.num_batches_tracked) == 0
    assert new.eps == bn.eps and new.momentum == bn.momentum
    assert torch.equal(bn.running_mean, torch.full((6,), 5.0))  # original untouched
    assert new(torch.randn(2, 10, 3, 3)).shape == (2, 10, 3, 3)


def test_fresh_like_groupnorm():
    gn = nn.GroupNorm(2, 8)
    with torch.no_grad():
        gn.weight.fill_(3.0)
    new = fresh_like(gn, 4)
    assert new.num_channels == 4 and new.num_groups == 2
    assert torch.equal(new.weight, torch.ones(4)) and torch.equal(new.bias, torch.zeros(4))


def test_registry_maps_layers_to_rules():
    assert RULES[nn.Conv2d].role == "conv" and RULES[nn.Conv2d].narrow is narrow_conv
    assert RULES[nn.Linear].narrow is narrow_linear
    assert RULES[nn.BatchNorm2d].role == "norm" and RULES[nn.BatchNorm2d].narrow is narrow_per_channel
    assert RULES[nn.GroupNorm].narrow is narrow_per_channel
    assert RULES[torch.cat].role == "cat"
    assert RULES[F.relu].role == "act" and RULES[nn.ReLU].narrow is None
    assert torch.roll not in RULES


# --------------------------------------------------------------------------- analyse


@functools.cache
def analysed(cls, **kwargs):
    traced = trace(seeded(cls, **kwargs), X)
    return traced, rules.find_stages(traced)


def stage_analysis(cls, index=0, **kwargs):
    traced, stages = analysed(cls, **kwargs)
    stage = stages[index]
    return stage, analyse(traced, stage.nodes, seed=stage.base)


def test_analyse_residual_stream_and_add_share_one_space():
    stage, a = stage_analysis(TinyResNet)
    sp = a.spaces
    stream = sp.find(a.info[stage.base].space)
    for name in ("add", "relu", "add_1", "relu_1", "add_2", "relu_2", "layer1_0_expand_0", "layer1_0_expand_1"):
        assert sp.find(a.info[name].space) == stream, name
    assert sp[stream].width == 8 and sp[stream].frozen == "" and sp[stream].blocks == 1
    # the 1x1 reduce conv reads the stream and writes an inner space of its own
    reduce = a.info["layer1_0_reduce_0"]
    assert sp.find(reduce.reads) == stream
    assert sp.find(reduce.space) != stream
    assert sp.find(a.info["layer1_0_spatial_0"].space) not in (stream, sp.find(reduce.space))
    assert sp.find(a.info["layer1_0_expand_0"].reads) == sp.find(a.info["layer1_0_spatial_0"].space)


class RollNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer1 = nn.Sequential(*[RollBlock(8) for _ in range(3)])

    def forward(self, x):
        return self.layer1(self.stem(x))


def test_analyse_freezes_stream_touched_by_op_without_rule():
    stage, a = stage_analysis(RollNet)
    space = a.spaces[a.info[stage.base].space]
    assert "roll" in space.frozen and "no channel rule" in space.frozen
    assert space.width == 8


def test_analyse_custom_leaf_without_rule_names_its_class():
    traced = trace(seeded(RollNet), X, leaf_modules=[f"layer1.{i}.shift" for i in range(3)])
    stage = rules.find_stages(traced)[0]
    a = analyse(traced, stage.nodes, seed=stage.base)
    assert "Shift" in a.spaces[a.info[stage.base].space].frozen


def test_analyse_grouped_convs_constrain_inner_widths():
    stage, a = stage_analysis(TinyResNet, groups=2)
    sp = a.spaces
    inner = a.info["layer1_0_reduce_0"].space  # what the grouped 3x3 conv reads
    assert sp[inner].blocks == 2
    assert sp[a.info["layer1_0_spatial_0"].space].blocks == 2
    assert sp[a.info[stage.base].space].blocks == 1  # the stream meets no grouped conv


class GroupedStream(nn.Module):
    """Blocks whose first conv is a grouped 3x3 conv reading the stream itself."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer1 = nn.Sequential(*[
            nn.Sequential(cbr(8, 8, 3, groups=4), cbr(8, 8, 1, act=False)) for _ in range(2)
        ])

    def forward(self, x):
        x = self.stem(x)
        for block in self.layer1:
            x = torch.relu(x + block(x))
        return x


def test_analyse_grouped_conv_on_stream_constrains_stream():
    stage, a = stage_analysis(GroupedStream)
    assert a.spaces[a.info[stage.base].space].blocks == 4
    assert a.spaces[a.info[stage.base].space].frozen == ""


def test_analyse_input_from_outside_region_is_frozen():
    traced, stages = analysed(TinyResNet)
    stage = stages[0]
    # analysing only the second block, seeded at the first block's output: the stem output
    # is not read, and the region's stream is its seed
    region = stage.blocks[1]
    a = analyse(traced, region, seed=stage.blocks[0][-1])
    assert a.spaces[a.info["add_1"].space].frozen == ""
    # seeded elsewhere, the block's input comes from outside and keeps its width
    b = analyse(traced, region, seed=stage.base)
    assert "outside the stage" in b.spaces[b.info["add_1"].space].frozen


def test_fresh_like_a_one_channel_norm_gets_the_new_width():
    """Width 1 means one channel for a norm (only PReLU's num_parameters=1 means shared)."""
    norm = fresh_like(nn.BatchNorm2d(1), 4)
    assert norm.num_features == 4 and norm.running_mean.shape == (4,) and norm.weight.shape == (4,)
    shared = fresh_like(nn.PReLU(), 4)
    assert shared.num_parameters == 1 and shared.weight.shape == (1,)


def test_fresh_like_a_group_norm_keeps_groups_that_divide_the_new_width():
    norm = fresh_like(nn.GroupNorm(2, 4), 7)
    assert (norm.num_groups, norm.num_channels) == (1, 7)
    norm(torch.randn(1, 7, 2, 2))  # runs
    assert fresh_like(nn.GroupNorm(4, 8), 12).num_groups == 4
