"""Channel slices, chunks and splits on the stream, partial and multi-branch residuals, and
channel counts read from shapes (issue 12, items 3 and 4).

Each model converts exactly (the partial stage computes, on its through channels, what the
original blocks compute when the bypass channels are zero at every block input) or is
refused with the reason. Slices and splits whose literal sizes narrowing changes convert:
the plan carries the new sizes to the rewrite (``StagePlan.args``) and notes each change.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn

import cspify
from cspify import rules
from cspify.rules import residual
from cspify.channels import NarrowingError, Slice, analyse, derive_keeps, index_axes, stream_axis
from cspify.errors import CspifyError, NoStageError
from cspify.measure import measure
from cspify.record import conversion_of
from cspify.trace import trace
from cspify.verify import drop_in_problems
from tiny_models import (
    C2fNet, GhostNetLike, MultiBranchNet, RepVggBlock, RexNetLike, ScaleViewNet, ShuffleNetLike, TinyResNet, ViewNet, cbr,
    randomize_norms, seeded,
)

X = torch.randn(2, 3, 16, 16)

# Whether the plan carries new literal sizes (slice bounds, split sizes) to the rewrite.


def model_of(cls, **kwargs):
    return randomize_norms(seeded(cls, **kwargs))


def stages_of(model):
    return cspify.find_stages(model, X)


def through_output(model, blocks, csp, stage=None):
    """(the converted stage's through output, the original's last block output with the
    bypass channels zeroed at every block input, the through part's channels), in eval mode."""
    record = next(s for s in conversion_of(csp).stages if s.converted and stage in (None, s.name))
    width = record.bypass_channels + record.through_channels
    if record.through_index:  # spread over the parts of a split: the output's are the input's
        through = list(record.through_index)
        bypass = [i for i in range(width) if i not in through]
    else:  # the last channels (of a block's input, and of a wider output as ReXNet's)
        through, bypass = slice(record.bypass_channels, None), slice(0, record.bypass_channels)

    def zero(module, args):
        x = args[0].clone()
        x[:, bypass] = 0
        return (x,)

    found = {}
    hooks = [block.register_forward_pre_hook(zero) for block in blocks]
    hooks.append(blocks[-1].register_forward_hook(lambda module, args, out: found.setdefault("out", out)))
    try:
        with torch.no_grad():
            model.eval()(X)
    finally:
        for hook in hooks:
            hook.remove()
    interpreter = fx.Interpreter(csp.eval(), garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(X)
    got = next(value for node, value in interpreter.env.items() if node.name == record.output)
    return got, found["out"], through


def assert_exact(model, blocks, csp, stage=None):
    got, want, through = through_output(model, blocks, csp, stage)
    torch.testing.assert_close(got, want[:, through])
    assert drop_in_problems(model, csp, X) == []


def literal_args(csp):
    """The getitem indexes and split sizes of the converted graph, by node name."""
    return {n.name: n.args[1] for n in csp.graph.nodes if n.op in ("call_function", "call_method") and len(n.args) > 1
            and getattr(n.target, "__name__", n.target) in ("getitem", "split")}


# --------------------------------------------------------------------------- the index rule


def test_index_axes_follow_slices_ints_none_and_ellipsis():
    full = slice(None)
    assert index_axes((full, slice(2, 4)), 4) == [(0, full, 0), (1, slice(2, 4), 1), (None, full, 2), (None, full, 3)]
    assert index_axes((full, None, slice(1, 3), Ellipsis, 0), 4) == [
        (0, full, 0), (2, slice(1, 3), 2), (None, full, 3), (4, 0, None)
    ]
    assert index_axes(slice(1, None), 2) == [(0, slice(1, None), 0), (None, full, 1)]
    assert index_axes((full, [0, 2]), 4) is None  # advanced indexing
    assert index_axes((full, slice(0, 4, 2)), 4)[1][1] == slice(0, 4, 2)  # a step: the channel rule decides


class Indexed(nn.Module):
    """A stream block whose branch indexes a tensor in one way (``how``)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.stem, self.a = cbr(3, 8, 3), cbr(8, 16, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=2 if how == "crop" else 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.a(x)
        y = {
            "crop": lambda: y[:, :8, 1:-1, 1:-1],
            "step": lambda: y[:, ::2],
            "one": lambda: y[:, :8] * y[:, 3, None],
            "halves": lambda: y[:, :8] * y[:, 8:],
        }[self.how]()
        return x + self.b(y)


def analysis_of(model):
    """The first stage of ``model`` and its channel analysis."""
    traced = trace(model, X)
    stage = rules.find_stages(traced)[0]
    return stage, analyse(traced, stage.nodes, stage.base)


def test_a_strict_channel_slice_reads_part_of_its_source():
    _, a = analysis_of(seeded(Indexed, "crop"))
    (sl,) = a.slices
    assert (sl.start, sl.stop, sl.entry) == (0, 8, 1)
    assert a.spaces.find(sl.source) == a.spaces.find(a.info["a_0"].space)
    assert a.spaces[sl.out].width == 8 and a.spaces[sl.source].width == 16
    assert a.info["getitem"].axis == 1 and a.spaces.find(a.info["getitem"].space) == a.spaces.find(sl.out)


def test_slices_that_take_each_channel_once_split_their_source():
    _, a = analysis_of(seeded(Indexed, "halves"))
    first, second = a.slices
    source = a.spaces[first.source]
    assert [a.spaces.find(s) for s in source.segments] == [a.spaces.find(first.out), a.spaces.find(second.out)]


@pytest.mark.parametrize("how, reason", [("step", "takes every 2th channel"), ("one", "takes channel 3 alone")])
def test_other_channel_indexes_keep_their_source_whole(how, reason):
    _, a = analysis_of(seeded(Indexed, how))
    assert reason in a.spaces[a.info["a_0"].space].frozen


def test_a_spatial_crop_is_no_channel_slice():
    model = model_of(GhostNetLike, crop=True)
    csp = cspify.convert(model, X)
    args = literal_args(csp)
    crops = [index for index in args.values() if isinstance(index, tuple) and len(index) == 4]
    assert crops and all(index[2:] == (slice(1, -1), slice(1, -1)) for index in crops)
    assert all(index[1] == slice(None) for index in crops)


# --------------------------------------------------------------------------- the keeps


def test_a_concat_of_one_space_twice_cannot_keep_a_contiguous_through_part():
    """GhostNet without its slice: the stream is cat(s, dw(s)), one space twice."""
    stage, a = analysis_of(seeded(GhostNetLike))
    stream = a.spaces.find(a.info[stage.base].space)
    cat = a.spaces.find(a.info["cat_1"].space)
    assert a.spaces[cat].segments is not None and stream != cat
    with pytest.raises(NarrowingError, match="would keep different channels"):
        derive_keeps(a, {cat: tuple(range(4, 8))})


def test_a_full_range_slice_on_a_concat_keeps_the_concat_whole_and_moves_its_bounds():
    stage, a = analysis_of(seeded(GhostNetLike))
    keeps = derive_keeps(a, {a.info[stage.base].space: tuple(range(4, 8))})
    assert keeps.of(a.info["cat_1"].space) is None  # the ghost module computes every channel
    assert keeps.of(a.info["getitem_1"].space) == (4, 5, 6, 7)
    assert keeps.args[("getitem_1", 1)] == (slice(None), slice(4, None))
    assert "'getitem_1' slices channels 0:8 of 'cat_1' by literal bounds, which narrowing moves to 4:8" in keeps.moved


def test_a_slice_of_a_narrowed_source_keeps_what_falls_in_its_range():
    _, a = analysis_of(seeded(Indexed, "crop"))
    source = a.info["a_0"].space
    keeps = derive_keeps(a, {source: tuple(range(4, 16))})
    assert keeps.of(a.info["getitem"].space) == (4, 5, 6, 7)
    assert keeps.args[("getitem", 1)] == (slice(None), slice(None, 4), slice(1, -1), slice(1, -1))


def test_chunk_parts_must_keep_the_widths_chunk_gives():
    stage, a = analysis_of(seeded(ShuffleNetLike, sizes=(8, 8), chunk=True))
    split = a.splits[0]
    assert len(a.splits) == 2 and split.chunks == 2 and [a.spaces[p].width for p in split.pieces] == [8, 8]
    stream = a.info[stage.base].space
    with pytest.raises(NarrowingError, match=r"'chunk' chunks 16 channels in 2, and narrowing would keep \[4, 8\]"):
        derive_keeps(a, {stream: tuple(range(4, 16))})
    keeps = derive_keeps(a, {stream: (*range(2, 8), *range(10, 16))})  # 6 and 6: chunk(2) splits 12 so
    assert keeps.args == {}
    with pytest.raises(NarrowingError, match="no channels"):
        derive_keeps(a, {stream: tuple(range(8, 16))})


def test_split_sizes_follow_their_parts():
    stage, a = analysis_of(seeded(ShuffleNetLike))
    keeps = derive_keeps(a, {a.info[stage.base].space: tuple(range(8, 16))})
    assert keeps.args == {("split", 1): [4, 4], ("split_1", 1): [4, 4]}
    assert keeps.moved[0] == "'split' splits its channels by the literal sizes [12, 4], which narrowing changes to [4, 4]"


# --------------------------------------------------------------------------- channel counts read from shapes


def test_a_reshape_to_another_tensors_channel_count_is_refused_at_planning():
    with pytest.raises(NoStageError) as refused:
        cspify.convert(model_of(ViewNet, kind="other"), X)
    reason = ("'view' in 'blocks.0' reshapes to the channel count of 'stem.2' ('getitem' in 'blocks.0'), so its channels "
              "cannot be narrowed")
    assert reason in refused.value.message
    assert "failed a check" not in refused.value.message


@pytest.mark.parametrize("kind", ["own", "literal"])
def test_a_reshape_of_the_stream_to_its_own_channel_count_converts(kind):
    """Read from its shape, the count follows narrowing; written as a literal, the rewrite
    writes the narrowed count in (a note says so)."""
    model = model_of(ViewNet, kind=kind)
    csp = cspify.convert(model, X)
    assert_exact(model, list(model.blocks), csp)
    notes = [n for s in conversion_of(csp).converted for n in s.notes]
    assert ("'view' reshapes the channels to the literal size 8, which narrowing changes to 4" in notes) == (kind == "literal")


def test_a_per_channel_parameter_viewed_with_its_literal_width_narrows():
    """timm's PoolFormer layer scale: ``x * self.scale.view(C, 1, 1)``."""
    model = model_of(ScaleViewNet)
    csp = cspify.convert(model, X)
    assert_exact(model, list(model.blocks), csp)
    views = [n.args[1:] for n in csp.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views and all(v == (4, 1, 1) for v in views)


class CountUser(nn.Module):
    """A block that adds its stream's channel count to its branch: x + f(x) + x.size(1)."""

    def __init__(self):
        super().__init__()
        self.stem, self.f = cbr(3, 8, 3), cbr(8, 8, 3)

    def forward(self, x):
        x = self.stem(x)
        return x + self.f(x) * x.size(1)


def test_a_channel_count_used_elsewhere_keeps_its_width():
    stage, a = analysis_of(seeded(CountUser))
    assert "'mul' uses the channel count of 'stem_2' ('size')" in a.spaces[a.info[stage.base].space].frozen


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("kwargs", [{}, {"c": 7, "hidden": 12}, {"crop": True}], ids=["full range", "strict", "crop"])
def test_ghost_modules_on_the_stream_convert_exactly(kwargs):
    model = model_of(GhostNetLike, **kwargs)
    csp = cspify.convert(model, X)
    assert_exact(model, list(model.blocks), csp)
    c = kwargs.get("c", 8)
    moved = [index for index in literal_args(csp).values() if index[1:] == (slice(c // 2 + c % 2, None if c % 2 == 0 else c),)]
    assert len(moved) == 3  # the stream's slice of each block now takes its through part


def test_a_split_stream_converts_with_its_split_sizes_narrowed():
    model = model_of(ShuffleNetLike)
    csp = cspify.convert(model, X)
    assert_exact(model, list(model.blocks), csp)
    assert [v for k, v in literal_args(csp).items() if k.startswith("split")] == [[4, 4], [4, 4]]


@pytest.mark.parametrize("kwargs, through, sizes", [
    ({"sizes": (4, 12)}, [2, 3, *range(10, 16)], [2, 6]),
    ({"sizes": (8, 8), "chunk": True}, [4, 5, 6, 7, 12, 13, 14, 15], None),
])
def test_a_split_whose_part_the_last_channels_miss_takes_the_through_part_from_every_part(kwargs, through, sizes):
    """FasterNet's and InceptionNeXt's blocks split the stream by literal sizes: the last
    channels as the through part would leave the first part none, so it takes the last
    channels of each part, in proportion (two narrows and a concat), and converts exactly."""
    model = model_of(ShuffleNetLike, **kwargs)
    csp = cspify.convert(model, X)
    (record,) = conversion_of(csp).converted
    assert list(record.through_index) == through
    assert any("the through part takes the last channels of each part" in note for note in record.notes)
    assert_exact(model, list(model.blocks), csp)
    if sizes:
        assert [v for k, v in literal_args(csp).items() if k.startswith("split")] == [sizes, sizes]


def test_a_split_the_through_part_cannot_reach_in_every_part_is_refused():
    with pytest.raises(NoStageError, match="narrowing would leave a part of 'split' in 'blocks.0' no channels"):
        cspify.convert(model_of(ShuffleNetLike, sizes=(1, 15)), X, gamma=0.75)


def test_c2f_converts_its_bottlenecks_on_a_chunk():
    model = model_of(C2fNet)
    found = {s.name: s for s in stages_of(model)}
    assert found["c2f.m.0"].base == "getitem_1"  # the second chunk
    for i in (0, 1):
        csp = cspify.convert(model, X, stages=[f"c2f.m.{i}"], allow_costlier=True)
        assert_exact(model, [model.c2f.m[i]], csp)


def test_partial_residuals_convert_exactly():
    model = model_of(RexNetLike)
    (stage,) = stages_of(model)
    assert (stage.kind, len(stage.blocks), stage.channels, stage.output) == ("residual", 3, 8, "cat_2")
    csp = cspify.convert(model, X)
    assert_exact(model, list(model.blocks), csp)
    # each block adds its input to the first channels of its narrowed output, 4 of 8, 6 of 10, 8 of 12
    args = literal_args(csp)
    assert [args[f"getitem{s}"][1] for s in ("", "_2", "_4")] == [slice(None, 4), slice(None, 6), slice(None, 8)]
    assert [args[f"getitem_{i}"][1] for i in (1, 3, 5)] == [slice(4, None), slice(6, None), slice(8, None)]


def test_a_block_with_two_branches_is_one_block():
    model = model_of(MultiBranchNet)
    (stage,) = stages_of(model)
    assert len(stage.blocks) == 3 and {"add", "add_1", "relu"} <= set(stage.blocks[0])
    csp = cspify.convert(model, X)
    assert_exact(model, list(model.blocks), csp)


def test_repvgg_blocks_narrow_their_identity_norm_with_the_stream():
    model = model_of(MultiBranchNet, block=RepVggBlock)
    (stage,) = stages_of(model)
    assert stage.base == "blocks_0_act" and len(stage.blocks) == 3  # the downsampling block is the base
    assert {"blocks_1_identity", "blocks_1_attn", "blocks_1_act"} <= set(stage.blocks[0])
    csp = cspify.convert(model, X)
    assert csp.get_submodule("blocks.1.identity").num_features == 4
    assert_exact(model, list(model.blocks)[1:], csp)


@pytest.mark.parametrize("options", [{"hidden": "scale"}, {"fusion": "first"}, {"gamma": 0.25}, {"gamma": 0.75}])
@pytest.mark.parametrize("cls, kwargs", [
    (GhostNetLike, {}), (GhostNetLike, {"c": 7, "hidden": 12}), (ShuffleNetLike, {}), (RexNetLike, {}),
    (MultiBranchNet, {}), (MultiBranchNet, {"block": RepVggBlock}), (ViewNet, {"kind": "own"}),
], ids=["ghost", "ghost strict", "split", "partial", "branches", "repvgg", "view"])
def test_every_option_converts_to_a_drop_in_or_refuses_cleanly(cls, kwargs, options):
    model = model_of(cls, **kwargs)
    try:
        csp = cspify.convert(model, X, allow_costlier=True, **options)
    except CspifyError as error:
        assert "bug in cspify" not in error.message and "failed a check" not in error.message, error.message
        return
    assert drop_in_problems(model, csp, X) == []


def test_residual_stages_found_before_keep_their_blocks():
    stage = stages_of(seeded(TinyResNet))[0]
    assert (stage.name, stage.base, len(stage.blocks), stage.output) == ("layer1", "stem_2", 3, "relu_2")
    assert stage.blocks[0] == ("layer1_0_reduce_0", "layer1_0_reduce_1", "layer1_0_reduce_2", "layer1_0_spatial_0",
                               "layer1_0_spatial_1", "layer1_0_spatial_2", "layer1_0_expand_0", "layer1_0_expand_1",
                               "add", "relu")


# --------------------------------------------------------------------------- timm


@functools.cache
def timm_conversion(name):
    """(model, a batch of 2, its conversion at 1x3x64x64 or None, the refusal)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)  # two samples: training-mode batch norms over 1x1 maps need them
    try:
        csp = cspify.convert(model, x[:1])
    except NoStageError as error:
        return model, x, None, error.message
    return model, x, csp, ""


def flops(model, x):
    return measure(model, (x,)).flops


def test_repvgg_a0_converts():
    model, x, csp, refused = timm_conversion("repvgg_a0")
    assert csp is not None, refused
    stages = conversion_of(csp).stages
    assert [s.name for s in stages if s.converted] == ["stages.0", "stages.1", "stages.2"]
    assert drop_in_problems(model, csp, x) == []
    assert flops(csp, x) < flops(model, x)


@pytest.mark.parametrize("name", ["ghostnet_100", "rexnet_100"])
def test_ghostnet_and_rexnet_convert_with_literal_sizes(name):
    model, x, csp, refused = timm_conversion(name)
    assert csp is not None, refused
    assert sum(s.converted for s in conversion_of(csp).stages) >= 4
    assert drop_in_problems(model, csp, x) == []
    assert flops(csp, x) < flops(model, x)


def test_stream_axis_follows_chunks_and_slices():
    traced = trace(seeded(ShuffleNetLike, sizes=(8, 8), chunk=True), X)
    stage = rules.find_stages(traced)[0]
    assert stream_axis(traced, stage.nodes, stage.base) == (1, "")


def test_slice_records_name_their_node():
    _, a = analysis_of(seeded(GhostNetLike))
    assert all(isinstance(s, Slice) and s.node.startswith("getitem") for s in a.slices)


class Implicit(nn.Module):
    """A crop written with an Ellipsis, which writes no channel bound: x + f(x)[..., 1:-1, 1:-1] padded back by a conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.f, self.g = cbr(3, 8, 3), cbr(8, 8, 3), nn.Conv2d(8, 8, 3, padding=2)

    def forward(self, x):
        x = self.stem(x)
        return x + self.g(self.f(x)[..., 1:-1, 1:-1])


def test_an_index_that_writes_no_channel_bound_keeps_its_channels():
    _, a = analysis_of(seeded(Implicit))
    assert a.slices == []
    assert a.spaces.find(a.info["getitem"].space) == a.spaces.find(a.info["f_2"].space)
    model = model_of(Implicit)
    assert drop_in_problems(model, cspify.convert(model, X, allow_costlier=True), X) == []


class CountOutside(nn.Module):
    """A block whose branch views its input by its own channel count, which a reshape after
    the block reads too."""

    def __init__(self):
        super().__init__()
        self.stem, self.f, self.head = cbr(3, 8, 3), cbr(8, 8, 3), nn.Linear(8 * 16 * 16, 5)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        y = x + self.f(x.view(B, C, H * W).view(B, C, H, W))
        return self.head(y.reshape(B, C * H * W))


def test_a_channel_count_read_in_the_stage_and_used_after_it_keeps_its_width():
    """(The residual rule finds no block here, as the count leaves the block; a region
    handed to the analysis as it is must still not narrow the stream.)"""
    traced = trace(seeded(CountOutside), X)
    names = list(traced.nodes)
    region = names[names.index("stem_2") + 1 : names.index("add") + 1]
    a = analyse(traced, region, "stem_2")
    assert "'mul_1' uses the channel count of 'stem_2' ('getitem_1')" in a.spaces[a.info["stem_2"].space].frozen


class FourBranch(nn.Module):
    """x + f(x) + g(x) + h(x): adds nested three deep."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.f, self.g, self.h = cbr(8, 8, 3), cbr(8, 8, 1), cbr(8, 8, 3)

    def forward(self, x):
        x = self.stem(x)
        return x + self.f(x) + self.g(x) + self.h(x)


def test_adds_nested_deeper_make_one_block():
    (stage,) = cspify.find_stages(seeded(FourBranch), X)
    assert len(stage.blocks) == 1 and {"add", "add_1", "add_2"} <= set(stage.blocks[0])


class RepGhostModule(nn.Module):
    """RepGhost's module: relu(dw(x1) + bn(x1)) with x1 a 1x1 conv of x: a residual block of
    its own (a depthwise branch and a BatchNorm identity)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.primary = cbr(cin, cout, 1)
        self.cheap, self.fusion_bn = cbr(cout, cout, 3, groups=cout, act=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.relu(self.cheap(x1) + self.fusion_bn(x1))


class Affine(nn.Module):
    """HGNetV2's learnable affine: x * scale + bias, one number each."""

    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * self.scale + self.bias


class Residual(nn.Module):
    def __init__(self, *branch):
        super().__init__()
        self.f = nn.Sequential(*branch)

    def forward(self, x):
        return x + self.f(x)


class RepGhostNet(nn.Module):
    """Residual blocks x + affine(ghost2(ghost1(x))) whose branches hold RepGhost modules."""

    def __init__(self, c=8, depth=3):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.blocks = nn.Sequential(*[Residual(RepGhostModule(c, 2 * c), RepGhostModule(2 * c, c), Affine()) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_a_block_inside_another_blocks_branch_is_no_stage_of_its_own():
    model = model_of(RepGhostNet)
    stages = cspify.find_stages(model, X)
    assert [(s.name, s.base, len(s.blocks)) for s in stages] == [("blocks", "stem_2", 3)]
    assert {"add", "add_1", "add_2", "add_3"} <= set(stages[0].blocks[0])  # the ghost modules' adds are the block's
    assert_exact(model, list(model.blocks), cspify.convert(model, X))


def test_a_bias_added_to_a_branch_is_no_branch():
    traced = trace(seeded(RepGhostNet), X)
    leaves, nested = residual._add_tree(traced.nodes["add_3"], traced.gm)
    assert [leaf.name for leaf in leaves] == ["stem_2", "add_2"] and nested == set()
