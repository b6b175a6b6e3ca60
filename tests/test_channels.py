"""Channel spaces (cspify/channels.py): which tensors of a stage must keep equal widths."""

import functools

import torch
import torch.nn as nn

from cspify import rules
from cspify.channels import COUPLINGS, analyse, stream_axis
from cspify.ops import OPS
from cspify.trace import trace
from tiny_models import ChannelsLastNet, MlpBlock, RollBlock, TinyDenseNet, TinyResNet, cbr, seeded

X = torch.randn(1, 3, 16, 16)


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


def test_every_coupling_the_op_table_names_exists():
    named = {op.couple for op in OPS.values() if op.couple is not None}
    assert named <= set(COUPLINGS), named - set(COUPLINGS)


# --------------------------------------------------------------------------- stream_axis


def axis_of(cls, index=0, **kwargs):
    traced, stages = analysed(cls, **kwargs)
    stage = stages[index]
    return stream_axis(traced, stage.nodes, stage.base)


def test_stream_axis_of_channels_first_streams_is_1():
    assert axis_of(TinyResNet) == axis_of(TinyResNet, 1) == (1, "")
    assert axis_of(TinyDenseNet) == (1, "")


def test_stream_axis_follows_permutes_to_the_convs():
    assert axis_of(ChannelsLastNet) == (3, "")  # not 1, the height


def test_stream_axis_of_layer_norm_and_linear_blocks_is_the_last():
    assert axis_of(ChannelsLastNet, block=MlpBlock) == (3, "")


class ConvAndLinear(nn.Module):
    """A block that reads its N,C,H,W stream with a conv, and its last axis with a linear."""

    def __init__(self, c=8, w=16):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(c, c, 3, padding=1), nn.Linear(w, w)

    def forward(self, x):
        return x + self.conv(x) * self.mix(x)


class Disagreeing(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer1 = nn.Sequential(ConvAndLinear(), ConvAndLinear())

    def forward(self, x):
        return self.layer1(self.stem(x))


def test_stream_axis_is_not_clear_where_two_layers_disagree():
    axis, why = axis_of(Disagreeing)
    assert axis is None
    assert why == (
        "'layer1_0_conv' treats axis 1 of its stream as channels but 'layer1_0_mix' treats axis 3 as channels, "
        "so which axis holds its channels is not clear"
    )


def test_stream_axis_names_the_op_it_cannot_follow():
    axis, why = axis_of(RollNet)
    assert axis is None and why == (
        "op 'roll' (node 'roll') has no channel rule, and before it no conv, norm or linear layer reads its stream, "
        "so which axis holds its channels is not clear"
    )


class NormOverHeight(nn.Module):
    """Writes N,C,H,W, then normalises the N,H,W,C view with a BatchNorm over H."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.norm, self.out = nn.Conv2d(c, c, 1), nn.BatchNorm2d(16), nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.out(y)


class NormOverHeightNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer1 = nn.Sequential(NormOverHeight(), NormOverHeight())

    def forward(self, x):
        return self.layer1(self.stem(x))


def test_analyse_freezes_channels_a_norm_reads_on_another_axis():
    stage, a = stage_analysis(NormOverHeightNet)
    inner = a.spaces[a.info["layer1_0_conv"].space]
    assert inner.frozen == "'layer1_0_norm' treats axis 1 as channels while they are on axis 3"
    assert a.spaces[a.info[stage.base].space].frozen == ""
