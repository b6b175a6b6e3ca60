"""Narrowed and fresh layers (cspify/narrow.py): each narrow function on its own."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

from cspify.narrow import (
    NARROWERS, can_mix, clone_module, fresh_conv, fresh_like, fresh_mix, narrow_conv, narrow_layer, narrow_linear,
    narrow_per_channel, reparametrization_problem, sized_like,
)


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


def test_narrow_layer_picks_the_function_the_op_table_names():
    old = nn.Conv2d(6, 4, 1)
    new = narrow_layer("conv", old, (0, 1, 2), None)
    assert new.in_channels == 3 and torch.equal(new.weight, old.weight[:, :3])
    assert NARROWERS["linear"] is narrow_linear and NARROWERS["per_channel"] is narrow_per_channel


def test_fresh_conv_is_a_1x1_conv_for_the_rank():
    conv = fresh_conv(4, 6, rank=4, bias=False)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert (conv.in_channels, conv.out_channels) == (4, 6)
    assert isinstance(fresh_conv(2, 2, rank=3, bias=True), nn.Conv1d)


# --------------------------------------------------------------------------- sized_like, fresh_mix


def test_sized_like_makes_per_channel_activations_fresh_and_copies_the_others():
    prelu = nn.PReLU(8)
    with torch.no_grad():
        prelu.weight.uniform_()
    new = sized_like(prelu, 4)
    assert new.num_parameters == 4 and torch.equal(new.weight, torch.full((4,), 0.25))
    shared = nn.PReLU(init=0.1)
    assert sized_like(shared, 4).num_parameters == 1 and sized_like(shared, 4).weight.item() == pytest.approx(0.1)
    leaky = sized_like(nn.LeakyReLU(0.3), 4)
    assert isinstance(leaky, nn.LeakyReLU) and leaky.negative_slope == 0.3
    assert prelu.num_parameters == 8  # the template is untouched


def test_fresh_mix_is_a_1x1_conv_over_axis_1_and_a_linear_over_the_last():
    torch.manual_seed(0)
    conv = fresh_mix(4, 6, rank=4, axis=1, bias=True)
    linear = fresh_mix(4, 6, rank=4, axis=3, bias=True)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(6, 4))
        linear.bias.copy_(conv.bias)
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(linear(x.permute(0, 2, 3, 1)), conv(x).permute(0, 2, 3, 1))
    assert can_mix(4, 1) and can_mix(4, 3) and can_mix(3, 2) and not can_mix(4, 2)
    with pytest.raises(ValueError):
        fresh_mix(4, 6, rank=4, axis=2, bias=True)


# --------------------------------------------------------------------------- reparametrized layers


def old_style(kind, layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(nn.utils, kind)(layer)


def reparametrized(kind, seed=0):
    layer = conv(6, 8, seed=seed)
    if kind.startswith("old "):
        return old_style(kind[4:], layer)
    return getattr(parametrizations, kind)(layer)


@pytest.mark.parametrize("kind", ["weight_norm", "old weight_norm"])
def test_narrow_under_weight_norm_keeps_the_narrowed_effective_weight(kind):
    old = reparametrized(kind)
    old(torch.randn(1, 6, 5, 5))  # the old hook leaves a computed weight that deepcopy refuses
    weight = old.weight.detach().clone()
    new = narrow_layer("conv", old, (1, 3, 5), (0, 2, 7))
    torch.testing.assert_close(new.weight, weight[[0, 2, 7]][:, [1, 3, 5]])
    assert reparametrization_problem(new) == "" and (new.in_channels, new.out_channels) == (3, 3)
    names = {name for name, _ in new.named_parameters()}
    assert names == ({"weight_g", "weight_v", "bias"} if kind.startswith("old") else
                     {"parametrizations.weight.original0", "parametrizations.weight.original1", "bias"})
    # the original is untouched and still runs
    torch.testing.assert_close(old.weight, weight)
    assert old(torch.randn(1, 6, 5, 5)).shape == (1, 8, 5, 5)


@pytest.mark.parametrize("kind", ["spectral_norm", "old spectral_norm"])
def test_narrow_under_spectral_norm_normalises_the_narrowed_weight_again(kind):
    old = reparametrized(kind)
    new = narrow_layer("conv", old, (1, 3, 5), (0, 2, 7))
    for training in (True, False):
        new.train(training)
        assert new(torch.randn(2, 3, 5, 5)).shape == (2, 3, 5, 5)
    sigma = torch.linalg.matrix_norm(new.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1, abs=0.05)
    buffers = {name: tuple(b.shape) for name, b in new.named_buffers()}
    assert buffers == ({"weight_u": (3,), "weight_v": (27,)} if kind.startswith("old") else
                       {"parametrizations.weight.0._u": (3,), "parametrizations.weight.0._v": (27,)})
    assert old(torch.randn(1, 6, 5, 5)).shape == (1, 8, 5, 5)


def test_an_unknown_parametrization_is_named():
    layer = parametrizations.orthogonal(conv(8, 8, k=1))
    assert reparametrization_problem(layer) == "its 'weight' is parametrized by _Orthogonal, which cspify cannot narrow"
    assert reparametrization_problem(conv(8, 8)) == ""


def test_clone_module_copies_a_layer_whose_hook_computed_its_weight():
    layer = old_style("weight_norm", conv(4, 4))
    layer(torch.randn(1, 4, 3, 3))
    with pytest.raises(RuntimeError):
        copy.deepcopy(layer)
    twin = clone_module(layer)
    torch.testing.assert_close(twin(torch.ones(1, 4, 3, 3)), layer(torch.ones(1, 4, 3, 3)))
    assert twin.weight_v is not layer.weight_v
