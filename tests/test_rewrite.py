"""The CSP rewrite through the public API, on tiny hand-written residual and dense models."""

import copy
import functools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import cspify
from cspify.config import CSPConfig
from cspify.errors import ConfigError, NoStageError
from cspify.plan import plan_stage
from cspify.rewrite import rewrite
from cspify.inplace import restore_inplace_adds
from cspify.trace import as_inputs, propagate_shapes, trace
from cspify import rules, verify
from cspify.record import conversion_of
from dataclasses import asdict
from tiny_models import (
    Bottleneck, ChannelsLastNet, IncrementalDense, LastBlock, LastDense, MlpBlock, PreActNet, TinyDenseNet, TinyResNet, cbr,
    randomize_norms, seeded, RollBlock,
)

X = torch.randn(2, 3, 16, 16)
MODELS = [TinyResNet, PreActNet, TinyDenseNet, IncrementalDense]


@functools.cache
def model_of(cls):
    return randomize_norms(seeded(cls))


@functools.cache
def converted(cls, **options):
    """``cls``'s seeded model and its conversion; each pair built once."""
    model = model_of(cls)
    return model, cspify.convert(model, X, **options)


def stage_meta(gm):
    return {s.name: asdict(s) for s in conversion_of(gm).stages}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- outputs, training


@pytest.mark.parametrize("cls", MODELS)
def test_outputs_keep_shape_and_dtype(cls):
    model, gm = converted(cls)
    assert any(s["converted"] for s in stage_meta(gm).values())
    with torch.no_grad():
        before, after = model(X), gm(X)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # the network really changed


@pytest.mark.parametrize("cls", [TinyResNet, TinyDenseNet])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_and_backward(cls, mode):
    _, gm = converted(cls)
    gm = copy.deepcopy(gm)
    gm.train(mode == "train")
    out = gm(X)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in gm.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    narrowed = "layer1.0.reduce.0.weight" if cls is TinyResNet else "block1.denselayer1.conv1.weight"
    assert grads[narrowed].abs().sum() > 0
    assert all(m.training == (mode == "train") for m in gm.modules())


def test_train_mode_updates_batchnorm_statistics():
    _, gm = converted(TinyResNet)
    gm = copy.deepcopy(gm)
    bn = gm.get_submodule("layer1.csp_transition.norm")
    before = bn.running_mean.clone()
    gm.train()
    gm(X)
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("cls", [TinyResNet, TinyDenseNet])
def test_user_model_is_untouched(cls):
    model = randomize_norms(seeded(cls)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text = repr(model)
    gm = cspify.convert(model, X)
    assert repr(model) == text
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert all(m.training for m in model.modules())  # modes restored
    assert gm is not model
    assert not any(p is q for p in gm.parameters() for q in model.parameters())


# --------------------------------------------------------------------------- weights kept


def test_residual_narrowed_layers_keep_through_channel_weights():
    model, gm = converted(TinyResNet)
    meta = stage_meta(gm)["layer1"]
    assert (meta["bypass_channels"], meta["through_channels"]) == (4, 4)
    for i in range(3):
        old = model.layer1[i]

        def new(name):
            return gm.get_submodule(f"layer1.{i}.{name}")

        # the first 1x1 conv reads only the through part: the LAST 4 of 8 channels
        assert torch.equal(new("reduce.0").weight, old.reduce[0].weight[:, 4:])
        # inner widths are kept whole
        assert torch.equal(new("spatial.0").weight, old.spatial[0].weight)
        # the last conv and its norm write only the through part
        assert torch.equal(new("expand.0").weight, old.expand[0].weight[4:])
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(new("expand.1"), name), getattr(old.expand[1], name)[4:]), name
        assert new("expand.1").num_features == 4
    # the projection block of layer2 is the base of layer2: whole
    assert torch.equal(gm.get_submodule("layer2.0.proj.0").weight, model.layer2[0].proj[0].weight)
    assert torch.equal(gm.get_submodule("layer2.1.reduce.0").weight, model.layer2[1].reduce[0].weight[:, 8:])


def test_residual_split_is_narrow_of_base():
    model, gm = converted(TinyResNet)
    narrows = [n for n in gm.graph.nodes if n.target is torch.narrow]
    args = sorted((n.args[0].name, n.args[1:]) for n in narrows)
    assert args == [("relu_3", (1, 0, 8)), ("relu_3", (1, 8, 8)), ("stem_2", (1, 0, 4)), ("stem_2", (1, 4, 4))]
    # the partial stage computes on the through part what the original blocks computed on
    # those channels when the bypass channels are zero
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(X)
        env = {n.name: v for n, v in interp.env.items()}
        expected = model.stem(X)
        torch.testing.assert_close(env["layer1_through"], expected[:, 4:])
        for i, block in enumerate(model.layer1):
            expected = expected.clone()
            expected[:, :4] = 0
            expected = block(expected)
            torch.testing.assert_close(env["relu" if i == 0 else f"relu_{i}"], expected[:, 4:])
    assert env["relu_2"].shape == (2, 4, 16, 16)
    assert env["layer1_fuse"].shape == (2, 8, 16, 16)
    torch.testing.assert_close(env["layer1_fuse"][:, :4], env["stem_2"][:, :4])


def test_dense_narrowed_layers_keep_their_channels():
    model, gm = converted(TinyDenseNet)
    meta = stage_meta(gm)["block1"]
    assert meta["converted"] and meta["bypass_channels"] == 4
    old = model.block1
    # layer i reads [x0 through (orig 4..7), f1, ..., f_{i-1}] = orig channels 4 .. 8+4(i-1)-1
    for i in range(3):
        keep = list(range(4, 8 + 4 * i))
        o, n = old[f"denselayer{i + 1}"], gm.get_submodule(f"block1.denselayer{i + 1}")
        assert torch.equal(n.conv1.weight, o.conv1.weight[:, keep])
        assert torch.equal(n.norm1.running_mean, o.norm1.running_mean[keep])
        assert torch.equal(n.conv2.weight, o.conv2.weight)  # growth rate kept
    # fusion last reuses the existing transition as the partial transition
    t_old, t_new = model.trans1, gm.get_submodule("trans1")
    assert torch.equal(t_new.conv.weight, t_old.conv.weight[4:, 4:])
    assert torch.equal(t_new.norm.running_var, t_old.norm.running_var[4:])
    assert not any("csp_transition" in name and name.startswith("block1") for name, _ in gm.named_modules())


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_gamma_sets_bypass_width(gamma):
    model, gm = converted(TinyResNet, gamma=gamma, allow_costlier=True)
    meta = stage_meta(gm)
    for name, c in (("layer1", 8), ("layer2", 16)):
        bypass = round(gamma * c)
        assert meta[name]["converted"]
        assert (meta[name]["bypass_channels"], meta[name]["through_channels"]) == (bypass, c - bypass)
    assert gm.get_submodule("layer1.0.reduce.0").in_channels == 8 - round(gamma * 8)
    assert gm.get_submodule("layer2.1.reduce.0").in_channels == 16 - round(gamma * 16)
    assert gm(X).shape == model(X).shape


def test_fusion_first_transitions_after_concat():
    model, gm = converted(TinyResNet, fusion="first", allow_costlier=True)
    meta = stage_meta(gm)
    assert conversion_of(gm).config.fusion == "first"
    assert meta["layer1"]["converted"]
    conv = gm.get_submodule("layer1.csp_transition.conv")
    assert (conv.in_channels, conv.out_channels) == (8, 8)  # over both parts
    last = converted(TinyResNet)[1].get_submodule("layer1.csp_transition.conv")
    assert (last.in_channels, last.out_channels) == (4, 4)  # over the through part only
    fuse = next(n for n in gm.graph.nodes if n.name == "layer1_fuse")
    assert [a.name for a in fuse.args[0]][0] == "layer1_bypass"
    assert list(fuse.users)[0].target == "layer1.csp_transition.conv"
    assert gm(X).shape == model(X).shape


def test_fusion_first_on_dense():
    model, gm = converted(TinyDenseNet, fusion="first")
    assert stage_meta(gm)["block1"]["converted"]
    assert gm(X).shape == model(X).shape


def test_hidden_scale_narrows_inner_widths():
    _, keep = converted(TinyResNet)
    model, scale = converted(TinyResNet, hidden="scale")
    assert keep.get_submodule("layer1.0.reduce.0").out_channels == 8
    assert scale.get_submodule("layer1.0.reduce.0").out_channels == 4
    assert scale.get_submodule("layer1.0.spatial.0").in_channels == 4
    assert n_params(scale) < n_params(keep) < n_params(model)
    assert scale(X).shape == model(X).shape


def test_stage_filter_converts_only_named_stage():
    model, gm = converted(TinyResNet, stages=("layer2",))
    meta = stage_meta(gm)
    assert not meta["layer1"]["converted"] and "filter" in meta["layer1"]["reason"]
    assert meta["layer2"]["converted"]
    assert "layer1_bypass" not in gm.code and "layer2_bypass" in gm.code
    assert torch.equal(gm.get_submodule("layer1.0.reduce.0").weight, model.layer1[0].reduce[0].weight)
    assert gm.get_submodule("layer2.1.reduce.0").in_channels == 8


def test_unknown_stage_raises_config_error():
    with pytest.raises(ConfigError, match="nope"):
        cspify.convert(model_of(TinyResNet), X, stages=["nope"])


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, "half"])
def test_bad_gamma_raises_config_error(gamma):
    with pytest.raises(ConfigError):
        cspify.convert(model_of(TinyResNet), X, gamma=gamma)


def test_empty_part_leaves_stage_unconverted_with_reason():
    model = seeded(TinyResNet, c=4)  # layer1 has 4 channels, layer2 has 8
    gm = cspify.convert(model, X, gamma=0.1, allow_costlier=True)
    meta = stage_meta(gm)
    assert not meta["layer1"]["converted"]
    assert "empty" in meta["layer1"]["reason"] and "0.1" in meta["layer1"]["reason"]
    assert meta["layer2"]["converted"] and meta["layer2"]["bypass_channels"] == 1
    assert "layer1_bypass" not in gm.code
    assert gm(X).shape == model(X).shape


def test_no_convertible_stage_raises_no_stage_error():
    with pytest.raises(NoStageError, match="empty"):
        cspify.convert(seeded(PreActNet, c=4), X, gamma=0.1)


# --------------------------------------------------------------------------- determinism, retrace


@pytest.mark.parametrize("cls", [TinyResNet, TinyDenseNet])
def test_conversion_is_deterministic(cls):
    model = model_of(cls)
    a, b = cspify.convert(model, X), cspify.convert(model, X)
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_by_hand_matches_convert():
    model, gm = converted(TinyResNet)
    traced = trace(model, X)
    config = CSPConfig(0.5)
    plans = [plan_stage(traced, stage, config) for stage in rules.find_stages(traced)]
    assert [p.converted for p in plans] == [True, True]
    by_hand, added = rewrite(traced, plans)
    assert set(added) == {"layer1", "layer2"}
    assert "layer1_bypass" in added["layer1"] and "layer1_fuse" in added["layer1"]
    propagate_shapes(by_hand, as_inputs(X))
    assert restore_inplace_adds(by_hand) == 6
    assert by_hand.code == gm.code


@pytest.mark.parametrize("cls", [TinyResNet, TinyDenseNet])
def test_converted_model_traces_again(cls):
    _, gm = converted(cls)
    again = fx.symbolic_trace(gm)
    with torch.no_grad():
        torch.testing.assert_close(again(X), gm(X))
    assert sum(n.target is torch.narrow for n in again.graph.nodes) == 2 * sum(
        s["converted"] for s in stage_meta(gm).values()
    )


# --------------------------------------------------------------------------- compare


def test_compare_reports_per_stage_savings():
    model, gm = converted(TinyResNet)
    report = cspify.compare(model, gm, X).to_dict()
    rows = {r["name"]: r for r in report["stages"]}
    assert list(rows) == ["layer1", "layer2"]
    for row in rows.values():
        assert row["kind"] == "residual" and row["converted"]
        assert 0 < row["flops_after"] < row["flops_before"]
        assert row["params_after"] < row["params_before"]
    for side in ("original", "converted"):
        assert set(report[side]) == {"flops", "params", "activations", "memory_bytes"}
        assert all(type(v) is int and v > 0 for v in report[side].values())
    assert report["converted"]["flops"] < report["original"]["flops"]
    assert report["converted"]["params"] == n_params(gm)
    assert report["original"]["params"] == n_params(model)
    assert report["options"] == {"gamma": 0.5, "fusion": "last", "hidden": "keep"}


class RollNet(nn.Module):
    """layer1: plain bottlenecks; layer2: blocks that torch.roll the stream before their branch."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer1 = nn.Sequential(*[Bottleneck(8, 8, 8) for _ in range(3)])
        self.mid = cbr(8, 8, 3)
        self.layer2 = nn.Sequential(*[RollBlock(8) for _ in range(3)])

    def forward(self, x):
        return self.layer2(self.mid(self.layer1(self.stem(x))))


@pytest.mark.parametrize("leaf", [False, True])
def test_op_without_rule_leaves_stage_unconverted(leaf):
    model = seeded(RollNet)
    leaves = [f"layer2.{i}.shift" for i in range(3)] if leaf else []
    gm = cspify.convert(model, X, leaf_modules=leaves)
    meta = stage_meta(gm)
    assert meta["layer1"]["converted"]
    assert not meta["layer2"]["converted"]
    assert ("'Shift'" if leaf else "'roll'") in meta["layer2"]["reason"]
    assert gm(X).shape == model(X).shape
    report = cspify.compare(model, gm, X, leaf_modules=leaves).to_dict()
    row = {r["name"]: r for r in report["stages"]}["layer2"]
    assert not row["converted"] and "no channel rule" in row["reason"]
    assert row["flops_after"] == row["flops_before"] > 0


# --------------------------------------------------------------------------- grouped stream


class GroupedStream(nn.Module):
    """Residual blocks whose first conv is a grouped 3x3 conv (4 groups) on the stream."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.layer1 = nn.Sequential(*[
            nn.Sequential(cbr(8, 16, 3, groups=4), cbr(16, 8, 1, act=False)) for _ in range(3)
        ])

    def forward(self, x):
        x = self.stem(x)
        for block in self.layer1:
            x = torch.relu(x + block(x))
        return x


def test_grouped_conv_on_stream_is_refused_with_its_reason():
    """A grouped conv reading the stream would see a contiguous through part spread over
    its groups (new group 0 reading channels of old group 2 with group 0's weights), so
    the stage is left as it is and the report names the conv."""
    model = seeded(GroupedStream)
    with pytest.raises(NoStageError, match="grouped conv"):
        cspify.convert(model, X, allow_costlier=True)


class PReLUNet(nn.Module):
    """Post-activation blocks whose activation after the add is a PReLU."""

    def __init__(self, slopes=1):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.fs = nn.ModuleList(nn.Sequential(cbr(8, 8, 3), cbr(8, 8, 3, act=False)) for _ in range(3))
        self.acts = nn.ModuleList(nn.PReLU(slopes) for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        for f, act in zip(self.fs, self.acts):
            x = act(x + f(x))
        return x


@pytest.mark.parametrize("slopes", [8, 1])
def test_prelu_on_stream(slopes):
    """nn.PReLU(8) is narrowed to the through channels; nn.PReLU() keeps its one shared slope."""
    model = seeded(PReLUNet, slopes)
    with torch.no_grad():
        for act in model.acts:
            act.weight.copy_(torch.linspace(0.05, 0.4, slopes))
    gm = cspify.convert(model, X)
    (stage,) = stage_meta(gm).values()
    assert stage["converted"] and stage["bypass_channels"] == 4
    assert gm(X).shape == model(X).shape
    act = gm.get_submodule("acts.0")
    expected = model.acts[0].weight[4:] if slopes == 8 else model.acts[0].weight
    assert torch.equal(act.weight, expected)


# --------------------------------------------------------------------------- the rewrite contract


@pytest.mark.parametrize("cls", [TinyResNet, TinyDenseNet])
@pytest.mark.parametrize("fusion", ["last", "first"])
def test_last_added_node_carries_the_stage_output(cls, fusion):
    """``added[stage][-1]`` is what every reader of the stage's output reads now, with the
    original output's shape: api.py finds each converted stage's output by it."""
    traced = trace(model_of(cls), X)
    plans = [plan_stage(traced, s, CSPConfig(0.5, fusion, allow_costlier=True)) for s in rules.find_stages(traced)]
    readers = {p.name: [u.name for u in traced.nodes[p.through_output].users] for p in plans}
    shapes = {p.name: traced.nodes[p.through_output].meta["tensor_meta"].shape for p in plans}
    gm, added = rewrite(traced, plans)
    propagate_shapes(gm, as_inputs(X))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert set(added) == {p.name for p in plans if p.converted} and len(added) == 2
    for plan in plans:
        carrier = nodes[added[plan.name][-1]]
        assert all(carrier in nodes[r].all_input_nodes for r in readers[plan.name]), plan.name
        assert carrier.meta["tensor_meta"].shape == shapes[plan.name]
        assert carrier.target == "to"  # the stage's output dtype (rewrite._as_dtype_of), of:
        fused = carrier.args[0]
        if fusion == "last" or plan.new_transition is None:
            assert fused.target is torch.cat  # the concat
        else:
            assert "csp_transition" in fused.name  # the new transition's last node


# --------------------------------------------------------------------------- layouts, layers, lazy modules


def split_of(gm, stage):
    """(axis, bypass width) of a converted stage's split, read from its bypass node."""
    record = next(s for s in conversion_of(gm).converted if s.name == stage)
    bypass = next(n for n in gm.graph.nodes if n.name == record.added[0])
    assert bypass.target is torch.narrow and bypass.args[2] == 0
    return bypass.args[1], bypass.args[3]


@pytest.mark.parametrize("block", [LastBlock, MlpBlock])
def test_a_channels_last_stream_is_split_along_its_channels(block):
    model = seeded(ChannelsLastNet, block=block)
    gm = cspify.convert(model, X)
    assert split_of(gm, "layer1") == (3, 4)
    transition = gm.get_submodule("layer1.csp_transition")
    assert isinstance(transition.conv, nn.Linear) and (transition.conv.in_features, transition.conv.out_features) == (4, 4)
    if block is MlpBlock:  # a LayerNorm over the last axis fits the layout: the transition copies it
        assert isinstance(transition.norm, nn.LayerNorm) and transition.norm.normalized_shape == (4,)
        assert gm.get_submodule("layer1.0.fc1").in_features == 4
    else:  # the block's BatchNorm2d reads N,C,H,W: no template for an N,H,W,C transition
        assert not hasattr(transition, "norm")
        assert gm.get_submodule("layer1.0.a").in_channels == 4
    assert verify.drop_in_problems(model, gm, X) == []


def test_a_channels_last_dense_block_converts():
    model = seeded(LastDense)
    gm = cspify.convert(model, X, allow_costlier=True)
    assert split_of(gm, conversion_of(gm).converted[0].name) == (3, 4)
    assert verify.drop_in_problems(model, gm, X) == []


class PReLUBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c)

    def forward(self, x):
        return x + self.act(self.norm(self.conv(x)))


def test_a_per_channel_activation_template_is_sized_to_the_transition():
    model = nn.Sequential(cbr(3, 8, 3), PReLUBlock(8), PReLUBlock(8)).eval()
    gm = cspify.convert(model, X)
    act = next(m for name, m in gm.named_modules() if "csp_transition" in name and isinstance(m, nn.PReLU))
    assert act.num_parameters == 4 and torch.equal(act.weight, torch.full((4,), 0.25))
    assert verify.drop_in_problems(model, gm, X) == []


def reparametrized_block(kind):
    block = LastBlock(8)
    if kind.startswith("old"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            block.a = getattr(nn.utils, kind[4:])(block.a)
    else:
        block.a = getattr(nn.utils.parametrizations, kind)(block.a)
    return block


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old weight_norm", "old spectral_norm"])
def test_reparametrized_convs_are_narrowed_under_their_reparametrization(kind):
    model = seeded(ChannelsLastNet)
    model.layer1 = nn.Sequential(*[reparametrized_block(kind) for _ in range(3)])
    model.train()(X).sum().backward()  # the older hooks now hold weights deepcopy refuses
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gm = cspify.convert(model.eval(), X)
    narrowed = gm.get_submodule("layer1.1.a")
    assert narrowed.in_channels == 4 and narrowed.weight.shape == (8, 4, 3, 3)
    assert narrowed.weight.shape == model.layer1[1].a.weight[:, 4:].shape
    if kind in ("weight_norm", "old weight_norm"):
        torch.testing.assert_close(narrowed.weight, model.layer1[1].a.weight[:, 4:])
    assert verify.drop_in_problems(model, gm, X) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "_u" not in k and "_v" not in k)


def test_lazy_modules_are_initialised_on_a_copy():
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), *[PReLUBlock(8) for _ in range(2)]).eval()
    gm = cspify.convert(model, X)
    assert model[0].has_uninitialized_params()  # the user's model is untouched
    assert split_of(gm, conversion_of(gm).converted[0].name) == (1, 4)
    assert gm(X).shape == model(X).shape


class LazyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.LazyConv2d(8, 3, padding=1), nn.LazyBatchNorm2d(), nn.LazyConv2d(8, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.norm(self.a(x)))))


def test_lazy_modules_everywhere_through_the_python_api():
    """LazyConv2d, LazyBatchNorm2d and LazyLinear inside the stages and the head: find_stages
    and convert initialise them on a copy (deepcopy refuses uninitialised parameters)."""
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), LazyBlock(), LazyBlock(),
                          nn.Flatten(), nn.LazyLinear(10)).eval()
    assert [s.kind for s in cspify.find_stages(model, X)] == ["residual"]
    gm = cspify.convert(model, X)
    assert conversion_of(gm).converted and gm(X).shape == (len(X), 10)
    assert all(isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
               for m in (model[0], model[2].a, model[2].norm, model[5]))  # the user's model is untouched


def test_new_layers_are_in_the_mode_of_the_model_they_join():
    """A transition added to a model in eval mode is in eval mode too (conv-bn fusion and
    anything else that reads ``training`` on leaves sees one mode)."""
    from torch.fx.experimental.optimization import fuse

    from tiny_models import TinyResNet, seeded

    model, x = seeded(TinyResNet), torch.randn(2, 3, 16, 16)
    csp = cspify.convert(model, x)
    added = [m for name, m in csp.named_modules() if "csp_transition" in name]
    assert added and not any(m.training for m in added)
    fused = fuse(csp)  # torch's conv-bn folding asserts every layer it folds is in eval mode
    with torch.no_grad():
        assert torch.allclose(fused(x), csp(x), atol=1e-5)


def test_a_stage_keeps_its_output_dtype_under_autocast():
    """A plain stage on the model's float32 input: its bypass stays float32 while the new
    transition conv computes in bfloat16 under autocast; the stage's output is cast back to
    the dtype the through part gives, as the original's output had."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())])
    x = torch.randn(2, 16, 8, 8)
    csp = cspify.convert(model.eval(), x, kinds="plain")
    assert conversion_of(csp).converted
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert csp(x).dtype == model(x).dtype == torch.bfloat16
