"""The stage kinds beyond the paper's residual and dense ones: plain conv chains and
aggregation blocks (rules/plain.py, rules/aggregation.py), the kind filter, and which
kind keeps nodes that two rules find."""

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.calibrate import calibrate
from cspify.config import CSPConfig
from cspify.errors import ConfigError, NoStageError
from cspify.record import conversion_of
from cspify.verify import drop_in_problems
from tiny_models import TinyResNet, cbr, seeded

X = torch.randn(2, 3, 16, 16)


class VGGLike(nn.Module):
    """Two plain stages: 8 -> 16 -> 16 -> 16 after a pool, and one whose first conv is strided."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.stage1 = nn.Sequential(cbr(8, 16, 3), cbr(16, 16, 3), cbr(16, 16, 3))
        self.stage2 = nn.Sequential(cbr(16, 24, 3, stride=2), cbr(24, 24, 3), cbr(24, 24, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x):
        return self.head(self.stage2(self.stage1(nn.functional.max_pool2d(self.stem(x), 2))))


class OSA(nn.Module):
    """VoVNet's one-shot aggregation: a chain of convs, its input and every output
    concatenated once, fused by a 1x1 conv."""

    def __init__(self, cin=16, width=8, cout=16, layers=3, skip=0):
        super().__init__()
        self.layers = nn.ModuleList(cbr(cin if i == 0 else width, width, 3) for i in range(layers))
        self.fuse = cbr(cin + layers * width + skip, cout, 1)

    def forward(self, x, skip=None):
        parts, y = [x], x
        for layer in self.layers:
            y = layer(y)
            parts.append(y)
        return self.fuse(torch.cat(parts + ([skip] if skip is not None else []), 1))


class VoVLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3, stride=2)
        self.osa1, self.osa2 = OSA(), OSA(16, 8, 24)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x):
        return self.head(self.osa2(self.osa1(self.stem(x))))


class SelecSLSLike(nn.Module):
    """Aggregation blocks whose concat also takes a skip from outside the block."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.first = OSA(16, 8, 16)
        self.second = OSA(16, 8, 16, skip=16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        y = self.first(x)
        return self.head(self.second(y, x))


class Parallel(nn.Module):
    """Branches of one input concatenated (Inception, SqueezeNet's Fire): no chain, no stage."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3, stride=2)
        self.a, self.b, self.c = cbr(8, 8, 1), cbr(8, 8, 3), nn.Sequential(cbr(8, 4, 1), cbr(4, 8, 3))

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.a(x), self.b(x), self.c(x)], 1)


def kinds(model, x=X, **kw):
    return [(s.name, s.kind, len(s.blocks)) for s in cspify.find_stages(model, x, **kw)]


def convert_checked(model, x=X, **kw):
    csp = cspify.convert(model, x, **kw)
    assert drop_in_problems(model, csp, x) == []
    report = cspify.compare(model, csp, x)
    assert report.converted.flops < report.original.flops
    return csp


# --------------------------------------------------------------------------- plain


def test_plain_stages_are_conv_chains_of_one_width_and_resolution():
    """A first conv that widens the stream, or a strided one, is left out of its chain, which
    then starts at its output: the bypass carries features at the stage's width."""
    model = seeded(VGGLike)
    assert kinds(model) == [("stage1", "plain", 2), ("stage2", "plain", 2)]
    stages = cspify.find_stages(model, X)
    assert stages[0].base == "stage1_0_2" and stages[1].base == "stage2_0_2"  # after the first conv's relu
    assert stages[0].inner == ("stage1_1_0", "stage1_2_0") and stages[0].channels == 16


class VGGStart(nn.Module):
    """VGG's first stage: two 16-wide convs straight on the input image."""

    def __init__(self, cin=3):
        super().__init__()
        self.features = nn.Sequential(cbr(cin, 16, 3), cbr(16, 16, 3), cbr(16, 16, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


def test_the_input_image_is_never_a_bypass():
    """VGG16's and a U-Net's first plain stage read the image: its colour channels would be the
    bypass (2 of 3), the first convs seeing one. The stage starts after the conv that makes its
    width, so the bypass carries features."""
    model = seeded(VGGStart)
    csp = convert_checked(model)
    [stage] = conversion_of(csp).converted
    assert stage.base == "features_0_2" and (stage.bypass_channels, stage.through_channels, stage.channels) == (8, 8, 16)
    assert csp.get_submodule("features.0.0").in_channels == 3  # the first conv sees every colour channel
    assert "narrow" not in str(next(n for n in csp.graph.nodes if n.op == "placeholder").users)


def test_a_stage_whose_layers_work_wider_than_its_base_is_refused_with_the_reason():
    """An aggregation block straight on the image: its layers work at 16 channels, its base has
    3, and the bypass cannot start after a layer (the concat reads the base)."""
    model = nn.Sequential(OSA(cin=3, width=16, cout=16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    [stage] = cspify.find_stages(model, X)
    assert stage.kind == "aggregation"
    with pytest.raises(NoStageError, match=r"the model's input has 3 channels, fewer than the 16 its layers work at"):
        cspify.convert(model, X)


def test_a_residual_chain_on_a_feature_map_input_stays_convertible():
    """A refiner fed 32-channel features by an upstream network: its base is the model's
    input, at the stream's own width."""
    from tiny_models import Bottleneck

    model = nn.Sequential(Bottleneck(32, 16, 32), Bottleneck(32, 16, 32)).eval()
    x = torch.randn(2, 32, 8, 8)
    csp = cspify.convert(model, x)
    [stage] = conversion_of(csp).converted
    assert stage.kind == "residual" and stage.bypass_channels == 16
    assert drop_in_problems(model, csp, x) == []


def test_a_plain_stage_runs_at_one_minus_gamma_of_its_width():
    model = seeded(VGGLike)
    csp = convert_checked(model, kinds="plain")
    stage2 = conversion_of(csp).stages[1]
    assert (stage2.bypass_channels, stage2.through_channels) == (12, 12)
    assert csp.get_submodule("stage2.1.0").in_channels == 12 and csp.get_submodule("stage2.1.0").out_channels == 12
    assert csp.get_submodule("stage2.2.0").out_channels == 12
    transition = csp.get_submodule("stage2.csp_transition.conv")
    assert (transition.in_channels, transition.out_channels) == (12, 12)  # joins the bypass's 12 to 24


def test_narrowed_plain_layers_keep_the_weights_of_the_channels_they_see():
    model = seeded(VGGLike)
    csp = cspify.convert(model, X, kinds="plain")
    before, after = model.stage2[1][0].weight, csp.get_submodule("stage2.1.0").weight
    assert torch.equal(after, before[:12, 12:])  # first 12 outputs (inner width), the through part's inputs


def test_a_plain_chain_starts_after_a_first_conv_that_narrows_it():
    """32 -> 8 -> 8 -> 8: a bypass of the 32-channel base would not fit the 8-channel output;
    from the first conv's output on, the chain converts."""
    model = nn.Sequential(cbr(3, 32, 3), nn.Sequential(cbr(32, 8, 1), cbr(8, 8, 3), cbr(8, 8, 3))).eval()
    [stage] = cspify.find_stages(model, X)
    assert (stage.kind, stage.base, stage.channels, len(stage.blocks)) == ("plain", "_1_0_2", 8, 2)
    assert drop_in_problems(model, cspify.convert(model, X), X) == []


class FiveConvNeck(nn.Module):
    """YOLOv3's neck in small: the coarse level upsampled and concatenated with the fine one
    (16 + 32 channels), then a 3x3 conv that narrows the concat (48 -> 16) and convs between
    16 and 32 channels."""

    def __init__(self):
        super().__init__()
        self.fine, self.coarse = cbr(3, 32, 3), cbr(3, 16, 3, stride=2)
        self.up = nn.Upsample(scale_factor=2)
        self.neck = nn.Sequential(cbr(48, 16, 3), cbr(16, 32, 3), cbr(32, 16, 1), cbr(16, 32, 3), cbr(32, 16, 1))

    def forward(self, x):
        return self.neck(torch.cat([self.up(self.coarse(x)), self.fine(x)], 1))


def test_a_plain_stage_starts_at_the_pyramid_concat_its_first_conv_narrows():
    """The first conv, the largest layer, runs on the through part too; the 16-channel
    output is not wider than the 24-channel bypass, so the parts join by fusion first."""
    model = seeded(FiveConvNeck)
    [stage] = cspify.find_stages(model, X)
    assert (stage.kind, stage.base, stage.channels, len(stage.blocks)) == ("plain", "cat", 48, 5)
    csp = cspify.convert(model, X)
    assert drop_in_problems(model, csp, X) == []
    assert csp.get_submodule("neck.0.0").in_channels == 24  # the through half of the concat
    (record,) = cspify.conversion_of(csp).converted
    assert record.notes[0].startswith("fusion first: its output (16 channels) is not wider than its bypass (24)")
    report = cspify.compare(model, csp, X)
    assert report.converted.max_layer_flops < report.original.max_layer_flops
    # the stage chose fusion first itself (the conversion's option is fusion last): calibration
    # still fits the new transition after the concat, to all of the original's output
    images = torch.randn(256, 3, 16, 16)
    calibrate(model, csp, images)
    assert ("neck.csp_transition.conv", "partial transition") in {
        (f.layer, f.role) for f in csp.meta["cspify.calibrate"].fits}
    with torch.no_grad():
        assert float((csp(images) - model(images)).pow(2).mean() / model(images).pow(2).mean()) < 0.5


def test_with_the_pyramid_compressed_each_part_of_the_split_is_compressed():
    """The stage still starts at the concat; the through half (24 channels) reaches the
    first conv as 12, the bypass half reaches the new transition as 12; calibration fits
    both with the stage."""
    model = seeded(FiveConvNeck)
    csp = cspify.convert(model, X, pyramid="maxout")
    (record,) = cspify.conversion_of(csp).converted
    assert (record.base, record.channels) == ("cat", 48)
    through, bypass = sorted(cspify.conversion_of(csp).fusions, key=lambda f: -f.start)
    assert (through.module, through.start, through.channels) == ("neck.0.0", 24, 24)
    assert csp.get_submodule("neck.0.0").in_channels == 12
    assert (bypass.start, bypass.channels) == (0, 24) and bypass.conv in record.added
    assert through.note.endswith("reads channels 24:48 of the pyramid concat 'cat' compressed by Maxout over 2 channels "
                                 "(24 -> 12)")
    assert drop_in_problems(model, csp, X) == []
    plain = cspify.compare(model, cspify.convert(model, X), X).converted
    assert cspify.compare(model, csp, X).converted.cio_bytes < plain.cio_bytes
    images = torch.randn(256, 3, 16, 16)
    calibrate(model, csp, images)
    fitted = {(f.layer, f.role) for f in csp.meta["cspify.calibrate"].fits}
    assert {("neck.0.0", "inner"), ("neck.csp_transition.conv", "partial transition")} <= fitted
    assert not any(role == "pyramid" for _, role in fitted)
    with torch.no_grad():
        error = float((csp(images) - model(images)).pow(2).mean() / model(images).pow(2).mean())
    assert error < 0.5


# --------------------------------------------------------------------------- aggregation


def test_one_shot_aggregation_blocks_are_aggregation_stages():
    model = seeded(VoVLike)
    stages = cspify.find_stages(model, X)
    assert [(s.kind, len(s.blocks), s.channels) for s in stages] == [("aggregation", 3, 16), ("aggregation", 3, 16)]
    assert stages[0].transition == ("osa1_fuse_0", "osa1_fuse_1", "osa1_fuse_2")
    assert stages[0].inner == ("osa1_layers_0_0", "osa1_layers_1_0", "osa1_layers_2_0")


def test_an_aggregation_stage_converts_as_csposanet_does():
    """Half the input goes through layers of half the width; the fusion conv becomes the
    partial transition and writes what the bypass does not fill."""
    model = seeded(VoVLike)
    csp = convert_checked(model)
    fuse = csp.get_submodule("osa2.fuse.0")
    assert fuse.in_channels == 8 + 3 * 4 and fuse.out_channels == 24 - 8
    assert csp.get_submodule("osa2.layers.0.0").in_channels == 8


def test_a_part_from_outside_the_block_stays_whole():
    model = seeded(SelecSLSLike)
    assert [s.kind for s in cspify.find_stages(model, X)] == ["aggregation", "aggregation"]
    csp = convert_checked(model)
    assert csp.get_submodule("second.fuse.0").in_channels == 8 + 3 * 4 + 16


def test_parallel_branches_are_no_aggregation():
    # branch c alone (8 -> 4 -> 8, the base's shape again) is a plain stage, as Inception's branches are
    assert kinds(seeded(Parallel)) == [("c", "plain", 2)]


# --------------------------------------------------------------------------- kinds and priority


def test_a_plain_chain_inside_a_residual_block_belongs_to_the_block():
    every = kinds(seeded(TinyResNet))
    assert {kind for _, kind, _ in every} == {"residual"} or all(
        kind == "plain" for name, kind, _ in every if name not in {n for n, k, _ in every if k == "residual"}
    )
    residual = cspify.find_stages(seeded(TinyResNet), X, kinds="residual")
    assert [s for s in cspify.find_stages(seeded(TinyResNet), X) if s.kind == "residual"] == residual


def test_kinds_filter_gives_the_papers_transform_alone():
    model = seeded(VGGLike)
    with pytest.raises(NoStageError, match="VGGLike has no residual or dense stage"):
        cspify.convert(model, X, kinds=("residual", "dense"))
    assert kinds(model, kinds="plain") == kinds(model)


@pytest.mark.parametrize("bad", ["chains", ["residual", "stack"], ""])
def test_an_unknown_kind_is_refused_in_one_sentence(bad):
    with pytest.raises(ConfigError, match="is not a kind of stage cspify finds") as info:
        CSPConfig(kinds=bad)
    assert "residual, dense, aggregation, plain" in info.value.hint


def test_kinds_come_in_rule_order():
    assert CSPConfig(kinds="plain,residual").kinds == ("residual", "plain")


def test_a_single_block_stage_that_does_not_pay_says_whether_hidden_scale_would():
    class OneBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 32, 3)
            self.a, self.b = cbr(32, 8, 1), cbr(8, 32, 1, act=False)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

        def forward(self, x):
            x = self.stem(x)
            return self.head(torch.relu(x + self.b(self.a(x))))

    model = seeded(OneBlock)
    with pytest.raises(NoStageError, match="with --hidden scale .* it pays"):
        cspify.convert(model, X, kinds="residual")
    csp = convert_checked(model, kinds="residual", hidden="scale")
    assert conversion_of(csp).stages[0].converted


# --------------------------------------------------------------------------- already cross stage partial


class C2fLike(nn.Module):
    """YOLOv8's C2f: split by chunk, bottlenecks on one half, every part concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 12, 3)
        self.cv1 = cbr(12, 16, 1)
        self.m = nn.ModuleList(nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3)) for _ in range(2))
        self.cv2 = cbr(32, 16, 1)

    def forward(self, x):
        y = list(self.cv1(self.stem(x)).chunk(2, 1))
        y.extend(y[-1] + m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3Like(nn.Module):
    """YOLOv5's C3: two 1x1 convs of one input, bottlenecks on one, a 1x1 conv fusing both."""

    def __init__(self, fused=True):
        super().__init__()
        self.fused = fused
        self.stem = cbr(3, 16, 3)
        self.cv1, self.cv2 = cbr(16, 8, 1), cbr(16, 8, 1)
        self.m = nn.ModuleList(nn.Sequential(cbr(8, 8, 1), cbr(8, 8, 3)) for _ in range(2))
        self.cv3 = cbr(16, 16, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.cv1(x)
        for m in self.m:
            y = y + m(y)
        out = torch.cat([y, self.cv2(x)], 1)
        return self.cv3(out) if self.fused else out


@pytest.mark.parametrize("cls", [C2fLike, C3Like])
def test_blocks_inside_a_csp_block_are_left_unless_named(cls):
    model = seeded(cls)
    stages = cspify.find_stages(model, X)
    assert stages and all(s.cross_stage.startswith("it is already the through part") for s in stages)
    with pytest.raises(NoStageError, match="already the through part of a cross stage partial block") as info:
        cspify.convert(model, X)
    assert "--stage" in info.value.hint
    csp = convert_checked(model, stages=[stages[0].name])  # named: nested
    assert [s.name for s in conversion_of(csp).converted] == [stages[0].name]


def test_parallel_branches_without_a_fusing_conv_are_no_csp_block():
    """Inception's concat of 1x1-conv branches feeds the next block, not one 1x1 conv."""
    stages = cspify.find_stages(seeded(C3Like, fused=False), X)
    assert stages and not any(s.cross_stage for s in stages)


def test_a_concat_of_tokens_is_no_csp_block():
    """CoaT's conv position encoding: the image tokens, split from the class token, run
    through convs as an image and are concatenated after the class token again, along the
    tokens, not the channels."""

    class ClassToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.cls = cbr(3, 8, 3), nn.Parameter(torch.zeros(1, 1, 8))
            self.convs = nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3))

        def forward(self, x):
            x = self.stem(x)
            b, c, h, w = x.shape
            tokens = torch.cat([self.cls.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
            cls, img = tokens[:, :1], tokens[:, 1:]
            img = self.convs(img.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            return torch.cat([cls, img], 1)

    stages = cspify.find_stages(seeded(ClassToken), X)
    assert [s.name for s in stages] == ["convs"] and not stages[0].cross_stage


def test_plain_chains_of_branches_that_read_one_input_are_each_found():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 8, 3)
            self.a = nn.Sequential(cbr(8, 8, 1), cbr(8, 8, 3))
            self.b = nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3))

        def forward(self, x):
            x = self.stem(x)
            return torch.cat([self.a(x), self.b(x)], 1)

    model = seeded(TwoBranches)
    assert kinds(model) == [("a", "plain", 2), ("b", "plain", 2)]
    convert_checked(model)
