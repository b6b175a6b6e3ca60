"""Planning (cspify/plan.py): every decision about a stage lands in one frozen StagePlan."""

import dataclasses
import functools

import pytest
import torch

from cspify import rules
from cspify.config import CSPConfig
from cspify.errors import ConfigError
import torch.nn as nn

from cspify.plan import half_up, per_block_keep, plan_stage, round_to
from cspify.trace import trace
from tiny_models import ChannelsLastNet, ConvAndLinear, MlpBlock, TinyDenseNet, TinyResNet, cbr, seeded

X = torch.randn(2, 3, 16, 16)


@functools.cache
def plans(cls, fusion="last", **options):
    traced = trace(seeded(cls), X)
    config = CSPConfig(0.5, fusion, allow_costlier=True, **options)
    return {s.name: plan_stage(traced, s, config) for s in rules.find_stages(traced)}


def test_plan_is_frozen_and_hashable():
    plan = plans(TinyResNet)["layer1"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.converted = False
    assert isinstance(plan.narrowings, tuple) and isinstance(plan.notes, tuple)
    assert hash(plan) == hash(dataclasses.replace(plan))


def test_fusion_last_residual_adds_a_transition_before_the_concat():
    plan = plans(TinyResNet)["layer1"]
    assert (plan.bypass_channels, plan.through_channels) == (4, 4)
    assert plan.partial_stage == plan.stage.nodes and plan.through_output == plan.stage.output == "relu_2"
    assert (plan.through_output_channels, plan.output_channels) == (4, 8)
    assert plan.new_transition == (4, 4)  # the through part's 4 channels to the 8 - 4 the bypass leaves
    assert (plan.norm_template, plan.act_template) == ("layer1_0_reduce_1", "layer1_0_reduce_2")


def test_fusion_first_residual_transitions_both_parts():
    plan = plans(TinyResNet, "first")["layer1"]
    assert plan.partial_stage == plan.stage.body
    assert plan.new_transition == (8, 8)


def test_dense_fusion_last_reuses_the_stage_transition():
    plan = plans(TinyDenseNet)["block1"]
    assert plan.stage.transition == ("trans1_norm", "trans1_relu", "trans1_conv")
    assert plan.through_output == "trans1_conv" and plan.partial_stage[-3:] == plan.stage.transition
    assert plan.new_transition is None
    assert plan.narrowing("trans1_conv").out_keep == tuple(range(4, 10))


def test_dense_fusion_first_keeps_the_stage_transition_after_the_concat():
    plan = plans(TinyDenseNet, "first")["block1"]
    assert plan.through_output == plan.stage.output == "cat_3"
    assert not set(plan.stage.transition) & set(plan.partial_stage)
    assert plan.new_transition is None  # bypass + through output fill the transition's input
    assert plan.bypass_channels + plan.through_output_channels == plan.output_channels


def test_narrowings_say_what_each_layer_keeps():
    plan = plans(TinyResNet)["layer1"]
    reduce = plan.narrowing("layer1_0_reduce_0")
    assert reduce.node == "layer1_0_reduce_0"
    assert reduce.in_keep == (4, 5, 6, 7) and reduce.out_keep is None
    assert plan.narrowing("layer1_0_spatial_0") is None  # inner widths kept


def test_refused_plans_say_why_and_decide_nothing():
    traced = trace(seeded(TinyResNet), X)
    stage = rules.find_stages(traced)[0]
    plan = plan_stage(traced, stage, CSPConfig(0.5, stages=("layer2",)))
    assert not plan.converted and plan.reason == "not selected by the stage filter"
    assert (plan.bypass_channels, plan.narrowings, plan.new_transition, plan.partial_stage) == (0, (), None, ())


def test_a_cost_note_where_allowed():
    notes = plans(TinyDenseNet)["block2"].notes
    assert any("would add" in note and "multiply-adds" in note for note in notes)


def test_rounding_helpers():
    assert round_to(5, 4, 1, 16) == 4 and round_to(6, 4, 1, 16) == 4 and round_to(7, 4, 1, 16) == 8 and round_to(3, 8, 1, 7) == 0
    assert per_block_keep(8, 4, 2) == (0, 1, 4, 5)


def plans_of(model, gamma=0.5, **options):
    traced = trace(model, X)
    config = CSPConfig(gamma, allow_costlier=True, **options)
    return {s.name: plan_stage(traced, s, config) for s in rules.find_stages(traced)}


def test_one_rounding_rule_half_up():
    assert [half_up(x) for x in (3.5, 6.5, 2.5, 0.55 * 10, 2.49, 0.5, 7.0)] == [4, 7, 3, 6, 2, 1, 7]
    for c, bypass in ((7, 4), (13, 7), (8, 4)):  # round() would give 4, 6, 4
        plan = plans_of(seeded(TinyResNet, c=c))["layer1"]
        assert (plan.bypass_channels, plan.through_channels) == (bypass, c - bypass)
    plan = plans_of(seeded(TinyResNet, c=13), gamma=0.25)["layer1"]  # 3.25 -> 3
    assert plan.bypass_channels == 3


def test_hidden_scale_rounds_inner_widths_half_up():
    plan = plans_of(seeded(TinyResNet, c=7), hidden="scale")["layer1"]  # (1 - 0.5) * 7 = 3.5 -> 4
    assert len(plan.narrowing("layer1_0_reduce_0").out_keep) == 4


def test_round_to_rounds_the_through_part_and_scaled_inner_widths_to_its_multiple():
    """24 channels at gamma 0.5: through 12, inner widths 12. round_to 8: 12 lies as near 8
    as 16, and a tie goes to the smaller (the bypass gets the extra channels, as half up
    gives them), so 8, each with a note; layer2 (48 channels, through 24) is a multiple
    already. At gamma 0.375 the through part of 15 goes to 16."""
    plan = plans_of(seeded(TinyResNet, c=24), hidden="scale", round_to=8)
    layer1, layer2 = plan["layer1"], plan["layer2"]
    assert (layer1.bypass_channels, layer1.through_channels) == (16, 8)
    assert "through part rounded from 12 to 8 channels (multiple of 8)" in layer1.notes
    assert len(layer1.narrowing("layer1_0_reduce_0").out_keep) == 8
    assert "inner width of 'layer1_0_reduce_0' rounded from 12 to 8 (multiple of 8)" in layer1.notes
    assert (layer2.bypass_channels, layer2.through_channels) == (24, 24)
    assert not any("rounded" in note and "through" in note for note in layer2.notes)
    plan = plans_of(seeded(TinyResNet, c=24), gamma=0.375, round_to=8)["layer1"]  # through 15 -> 16
    assert (plan.bypass_channels, plan.through_channels) == (8, 16)


def test_round_to_that_leaves_no_through_part_is_refused_with_why():
    plan = plans_of(seeded(TinyResNet, c=12), round_to=16)["layer1"]
    assert not plan.converted
    assert plan.reason == "no through part of 1 to 11 of its 12 channels is a multiple of 16 (round_to and its layers' groups)"


@pytest.mark.parametrize("value", [0, -8, 2.5, "eight", None])
def test_bad_round_to_is_refused(value):
    with pytest.raises(ConfigError, match="round_to must be a positive whole number of channels"):
        CSPConfig(round_to=value)
    assert CSPConfig(round_to="16").round_to == 16


def test_a_stage_whose_channel_axis_is_not_clear_is_refused_with_why():
    (plan,) = plans_of(nn.Sequential(cbr(3, 8, 3), ConvAndLinear(), ConvAndLinear()).eval()).values()
    assert not plan.converted and plan.reason == plan.stage.axis_problem
    assert "treats axis 3 as channels, so which axis holds its channels is not clear" in plan.reason


def test_channels_last_plans_split_the_last_axis_and_pick_templates_that_fit_it():
    plan = plans_of(seeded(ChannelsLastNet))["layer1"]
    assert plan.converted and plan.stage.channel_axis == 3
    assert (plan.bypass_channels, plan.through_channels, plan.new_transition) == (4, 4, (4, 4))
    assert (plan.norm_template, plan.act_template) == (None, None)  # the BatchNorm2d reads N,C,H,W, not the stream
    plan = plans_of(seeded(ChannelsLastNet, block=MlpBlock))["layer1"]
    assert plan.converted and plan.norm_template == "layer1_0_norm"  # a LayerNorm over the last axis fits


def test_a_layer_under_an_unknown_parametrization_is_refused_with_why():
    model = seeded(TinyResNet)
    nn.utils.parametrizations.orthogonal(model.layer1[0].reduce[0])
    plan = plans_of(model)["layer1"]
    assert not plan.converted
    assert plan.reason == "'layer1_0_reduce_0' (ParametrizedConv2d): its 'weight' is parametrized by _Orthogonal, which cspify cannot narrow"
    assert plans_of(model)["layer2"].converted


class MiddleBlock(nn.Module):
    """A stream kept N,H,C,W: its channels on axis 2."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2)).transpose(1, 2)


def test_a_stream_no_pointwise_layer_can_transition_is_refused_with_why():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.layer1 = cbr(3, 8, 3), nn.Sequential(MiddleBlock(), MiddleBlock())

        def forward(self, x):
            return self.layer1(self.stem(x).transpose(1, 2))

    plan = plans_of(seeded(Net))["layer1"]
    assert plan.stage.channel_axis == 2 and not plan.converted
    assert plan.reason == (
        "its channels are on axis 2 of the 4-dim 'add_1', where neither a 1x1 conv nor a linear layer can be its "
        "partial transition"
    )
