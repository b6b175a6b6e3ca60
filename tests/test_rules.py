"""Stage detection (rules/residual.py, rules/dense.py) on tiny hand-written models."""

import functools

import pytest
import torch
import torch.nn as nn

import cspify
from cspify import rules
from cspify.errors import NoStageError
from cspify.trace import trace
from tiny_models import (
    ConvAndLinear,
    flat_renamed, ChannelsLastNet, LastDense, MlpBlock,
    Bottleneck, DenseBlock, IncrementalDense, PreActNet, TinyDenseNet, TinyResNet, cbr, seeded,
)

X = torch.randn(1, 3, 16, 16)


def stages_of(model, x=X, kinds=None):
    return cspify.find_stages(model, x, kinds=kinds)


@functools.cache
def analysed(cls):
    """(traced, stages) of a seeded instance of ``cls``, traced once per test session."""
    traced = trace(seeded(cls), X)
    return traced, rules.find_stages(traced)


def found(cls):
    return analysed(cls)[1]


def node_of(cls, name):
    return analysed(cls)[0].nodes[name]


def summary(stages):
    return [(s.kind, s.channels, len(s.blocks), tuple(len(b) for b in s.blocks), bool(s.transition)) for s in stages]


# --------------------------------------------------------------------------- residual


def test_post_activation_resnet_stages():
    stages = found(TinyResNet)
    assert [s.name for s in stages] == ["layer1", "layer2"]
    assert [s.kind for s in stages] == ["residual", "residual"]
    assert [s.channels for s in stages] == [8, 16]
    assert [len(s.blocks) for s in stages] == [3, 2]
    layer1 = stages[0]
    # the relu after the add belongs to the block and is its output
    for block, (add, relu) in zip(layer1.blocks, [("add", "relu"), ("add_1", "relu_1"), ("add_2", "relu_2")]):
        assert block[-2:] == (add, relu)
    assert layer1.output == "relu_2"
    out = node_of(TinyResNet, layer1.output)
    assert out.target is torch.relu and out.args[0].name == "add_2"
    assert layer1.transition == ()


def test_chain_from_stem_has_stem_output_as_base():
    stage = found(TinyResNet)[0]
    assert stage.base == "stem_2"  # the stem's ReLU, the input of the first block
    assert not any(n.startswith("stem") for n in stage.nodes)


def test_projection_block_is_base_not_part_of_chain():
    layer2 = found(TinyResNet)[1]
    # the first block of layer2 downsamples (projection shortcut): its output is the base
    assert layer2.base == "relu_3"
    base = node_of(TinyResNet, "relu_3")
    assert base.args[0].name == "add_3"
    assert not any(n.startswith("layer2_0_") for n in layer2.nodes)
    assert "add_3" not in layer2.nodes
    assert [b[-2] for b in layer2.blocks] == ["add_4", "add_5"]


def test_pre_activation_add_is_last_op():
    (stage,) = found(PreActNet)
    assert stage.kind == "residual" and stage.channels == 8 and len(stage.blocks) == 3
    assert stage.base == "stem"
    assert [b[-1] for b in stage.blocks] == ["add", "add_1", "add_2"]
    assert stage.output == "add_2"
    assert all(len(b) == 7 for b in stage.blocks)  # bn relu conv bn relu conv add


class AddForms(nn.Module):
    """Three identity blocks written with one of the ways Python code spells an add."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.stem = cbr(3, 8, 3)
        self.fs = nn.ModuleList(nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3, act=False)) for _ in range(3))
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.stem(x)
        for f in self.fs:
            if self.form == "op":
                y = f(x) + x
            elif self.form == "torch.add":
                y = torch.add(x, f(x))
            elif self.form == "method":
                y = x.add(f(x))
            elif self.form == "scaled":
                y = x * 0.5 + f(x)
            elif self.form == "scaled left, divided":
                y = f(x) + 0.5 * x / 2
            else:
                y = f(x)
                y += x
            x = self.act(y)
        return x


@pytest.mark.parametrize("form", ["op", "torch.add", "method", "iadd", "scaled", "scaled left, divided"])
def test_add_spellings_are_all_residual_blocks(form):
    (stage,) = stages_of(seeded(AddForms, form))
    assert (stage.kind, stage.channels, len(stage.blocks), stage.base) == ("residual", 8, 3, "stem_2")
    assert stage.output == "act_2"  # the nn.ReLU module after the last add


def test_a_shortcut_scaled_by_a_number_belongs_to_its_block():
    """x * 0.5 acts on every channel alike, so it commutes with the channel split: it is an
    op of the block, which reads the through part."""
    (stage,) = stages_of(seeded(AddForms, "scaled"))
    assert [n for n in stage.blocks[0] if n.startswith("mul")] == ["mul"]
    csp = cspify.convert(seeded(AddForms, "scaled"), X)
    mul = next(n for n in csp.graph.nodes if n.name == "mul")
    assert mul.args[0].name.endswith("_through")


class ScaledShortcut(nn.Module):
    """Shortcuts scaled in place, or by a learned tensor: not identity-like."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.stem = cbr(3, 8, 3)
        self.fs = nn.ModuleList(nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3, act=False)) for _ in range(2))
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        for f in self.fs:
            y = f(x)
            x = torch.relu((x.mul_(0.5) if self.form == "in place" else x * self.scale) + y)
        return x


@pytest.mark.parametrize("form", ["in place", "learned"])
def test_a_shortcut_scaled_in_place_or_by_a_tensor_is_no_identity(form):
    assert stages_of(seeded(ScaledShortcut, form), kinds="residual") == []


class NoStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.fs = nn.ModuleList(nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3, act=False)) for _ in range(2))

    def forward(self, x):
        for f in self.fs:
            x = x + f(x)
        return x


def test_model_input_can_be_the_base():
    (stage,) = stages_of(seeded(NoStem), torch.randn(1, 8, 8, 8))
    assert stage.base == "x" and len(stage.blocks) == 2 and stage.output == "add_1"


class SecondOutput(nn.Module):
    """Three identity blocks, the first one's output also returned: the chain breaks there."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.blocks = nn.Sequential(*[Bottleneck(8, 8, 8) for _ in range(3)])

    def forward(self, x):
        x = self.stem(x)
        a = self.blocks[0](x)
        return self.blocks[2](self.blocks[1](a)), a


def test_chain_breaks_where_block_output_is_used_elsewhere():
    stages = stages_of(seeded(SecondOutput))
    assert [(s.kind, len(s.blocks)) for s in stages] == [("residual", 1), ("residual", 2)]
    first, second = stages
    assert first.base == "stem_2"
    assert second.base == first.output  # the shared tensor is the base, not a member
    assert first.output not in second.nodes
    assert set(first.nodes).isdisjoint(second.nodes)


class TrivialAdds(nn.Module):
    """x + x and x + relu(x): adds without a conv on the branch are not blocks."""

    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        x = x + x
        x = x + torch.relu(x)
        x = torch.relu(x) + x
        return self.head(x)


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(3, 8, 3), cbr(8, 8, 3), cbr(8, 8, 3), nn.MaxPool2d(2), cbr(8, 16, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.body(x))


class Inception(nn.Module):
    """Parallel branches of one input concatenated: not a dense block."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.b1, self.b2, self.b3, self.b4 = cbr(8, 4, 1), cbr(8, 4, 3), cbr(8, 4, 3), cbr(8, 4, 1)
        self.c1, self.c2, self.c3 = cbr(16, 4, 1), cbr(16, 4, 3), cbr(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return torch.cat([self.c1(x), self.c2(x), self.c3(x)], 1)


@pytest.mark.parametrize("cls", [Inception, TrivialAdds])
def test_no_stage(cls):
    model = seeded(cls)
    assert stages_of(model) == []
    with pytest.raises(NoStageError):
        cspify.convert(model, X)


def test_a_plain_cnn_has_a_plain_stage_only():
    model = seeded(PlainCNN)
    # the first conv reads the image: the chain starts at its output
    assert [(s.name, s.kind, len(s.blocks)) for s in stages_of(model)] == [("body", "plain", 2)]
    with pytest.raises(NoStageError, match="no residual or dense stage"):
        cspify.convert(model, X, kinds=("residual", "dense"))


class FiveConvNeck(nn.Module):
    """YOLOv3's five-conv set after a pyramid concat: 1x1 and 3x3 convs alternating between
    two widths (80 -> 16, 32, 16, 32, 16), its output read twice (a head conv, the next level)."""

    def __init__(self):
        super().__init__()
        self.stem, self.up = cbr(3, 32, 3), cbr(32, 48, 3)
        self.five = nn.Sequential(cbr(80, 16, 1), cbr(16, 32, 3), cbr(32, 16, 1), cbr(16, 32, 3), cbr(32, 16, 1))
        self.head, self.lateral = cbr(16, 32, 3), cbr(16, 8, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.five(torch.cat([s, self.up(s)], 1))
        return self.head(y), self.lateral(y)


def test_a_five_conv_set_of_two_widths_is_a_plain_stage_after_its_first_conv():
    model = seeded(FiveConvNeck)
    stage, = stages_of(model)
    # the first 1x1 conv makes the width (80 -> 16): its output is the base; the run ends at
    # the last output of the base's shape; every conv of it narrows, the wide 3x3s included
    assert (stage.name, stage.kind, stage.base, stage.channels, len(stage.blocks)) == ("five", "plain", "five_0_2", 16, 4)
    assert stage.inner == ("five_1_0", "five_2_0", "five_3_0", "five_4_0")
    csp = cspify.convert(model, X)
    (s,) = cspify.conversion_of(csp).converted
    assert (s.bypass_channels, s.through_channels) == (8, 8)
    widths = {name: m.out_channels for name, m in csp.named_modules() if isinstance(m, nn.Conv2d)}
    assert [widths[f"five.{i}.0"] for i in range(5)] == [16, 16, 8, 16, 8]  # the base's conv kept, the run halved
    assert widths["head.0"] == 32 and widths["lateral.0"] == 8
    out, ref = csp(X), model(X)
    assert [o.shape for o in out] == [r.shape for r in ref]


def test_a_bottleneck_stack_reading_the_image_is_refused():
    """A run whose base is the model's input (3 channels) would send image channels round the
    stage: refused with the reason, as before."""
    model = seeded(lambda: nn.Sequential(cbr(3, 8, 3), cbr(8, 3, 3), cbr(3, 8, 3), cbr(8, 3, 3)))
    stages = stages_of(model)
    assert [s.base for s in stages] == ["input_1"]
    record = cspify.conversion_of(cspify.convert(model, X, refuse_none=False))
    assert "fewer than the 8 its layers work at" in record.stages[0].reason


# --------------------------------------------------------------------------- dense


def test_torchvision_style_dense_blocks():
    stages = found(TinyDenseNet)
    assert [s.name for s in stages] == ["block1", "block2"]
    assert [s.kind for s in stages] == ["dense", "dense"]
    assert [s.channels for s in stages] == [8, 10]
    assert [len(s.blocks) for s in stages] == [3, 3]
    block1 = stages[0]
    assert block1.base == "stem_2"
    assert block1.output == "cat_3"  # the final concat of all features
    out = node_of(TinyDenseNet, "cat_3")
    assert out.target is torch.cat and len(out.args[0]) == 4
    # each block reads the concat of everything before it and ends in its second conv
    for i, block in enumerate(block1.blocks):
        assert f"block1_denselayer{i + 1}_conv2" in block
        assert all(n.startswith(("cat", f"block1_denselayer{i + 1}_")) for n in block)
    assert stages[1].base == "trans1_pool"


def test_dense_transition_before_pooling():
    block1, block2 = found(TinyDenseNet)
    assert block1.transition == ("trans1_norm", "trans1_relu", "trans1_conv")
    assert "trans1_pool" not in block1.nodes
    # block2 is followed by norm, relu and pooling but no 1x1 conv: no transition
    assert block2.transition == ()


class DenseThen3x3(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.block = DenseBlock(3, 8, 4)
        self.norm, self.relu = nn.BatchNorm2d(20), nn.ReLU()
        self.conv = nn.Conv2d(20, 10, 3, 1, 1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(self.relu(self.norm(self.block(self.stem(x))))))


def test_no_transition_when_conv_after_block_is_not_1x1():
    (stage,) = stages_of(seeded(DenseThen3x3))
    assert stage.kind == "dense" and len(stage.blocks) == 3
    assert stage.transition == ()


def test_incremental_dense_form():
    (stage,) = found(IncrementalDense)
    assert stage.kind == "dense"
    assert stage.channels == 8 and len(stage.blocks) == 3
    assert stage.base == "stem_2"
    assert stage.output == "cat_2"
    assert [sum(n.startswith(f"layers_{i}_") for n in b) for i, b in enumerate(stage.blocks)] == [3, 3, 3]


# --------------------------------------------------------------------------- names


def test_renamed_modules_give_the_same_stages():
    plain = found(TinyResNet)
    renamed_model = seeded(TinyResNet, names=("a", "b", "zz", "q"), block_names=("x1", "x2", "x3", "x4"))
    renamed = stages_of(renamed_model)
    assert summary(renamed) == summary(plain)
    assert [s.name for s in renamed] == ["b", "zz"]


@pytest.mark.parametrize("cls", [TinyResNet, TinyDenseNet, PreActNet])
def test_flat_renamed_modules_give_the_same_stages(cls):
    plain, flat = found(cls), stages_of(flat_renamed(seeded(cls)))
    assert summary(flat) == summary(plain)
    assert len(plain) >= 1


def test_find_stages_pipeline_matches_public_api():
    assert cspify.find_stages(seeded(TinyDenseNet), X) == found(TinyDenseNet)


# --------------------------------------------------------------------------- channel axis


def test_a_channels_last_stream_is_split_along_its_channels_not_its_height():
    (stage,) = stages_of(seeded(ChannelsLastNet))
    assert (stage.channel_axis, stage.channels, stage.axis_problem) == (3, 8, "")
    (stage,) = stages_of(seeded(ChannelsLastNet, block=MlpBlock))
    assert (stage.channel_axis, stage.channels) == (3, 8)


def test_a_stage_whose_channel_axis_is_not_clear_says_why():
    (stage,) = stages_of(nn.Sequential(cbr(3, 8, 3), ConvAndLinear(), ConvAndLinear()).eval())
    assert (stage.channel_axis, stage.channels) == (None, 0)
    assert "'_1_conv' treats axis 1 of its stream as channels but '_1_mix' treats axis 3" in stage.axis_problem


def test_dense_blocks_concatenate_along_their_channel_axis():
    (stage,) = stages_of(seeded(LastDense))
    assert (stage.kind, stage.channel_axis, stage.channels, len(stage.blocks)) == ("dense", 3, 8, 3)
    assert [s for s in stages_of(seeded(LastDense, "height")) if s.kind == "dense"] == []
